// y = x @ W for a weight matrix kept in blocks of 32 integers, inside XLA:CPU through jax.ffi.
//
// Written by hand: no library offers a CPU matmul of GGUF-style blocks callable from XLA. Two
// arithmetics, neither writing a dequantized copy of the weights:
//   exact (the default): each weight block is widened to f32 in registers and meets x in f32
//     FMAs, scaled per block: the pure-JAX path's numbers up to the order of the sums;
//   int8 activations (llama.cpp's, ggml-cpu): each row of x is quantized once per call to 8-bit
//     blocks of 32 (scale = max|x| / 127), and each weight block meets the activation block in an
//     integer dot product on 1-byte lanes, scaled afterwards — fewer instructions, but the
//     rounding of x moves the logits (near-ties flip, as they do in llama.cpp).
//
// Weights, per output row n and block b of 32 inputs (W[k, n] = scale * q + min):
//   q8: quants int8 (L, N, K)        two's-complement values, any range of int8
//   q4: quants uint8 (L, N, K / 2)   values 0..15, byte j of a block holding value j in its low
//                                    nibble and value j + 16 in its high one (llama.cpp's order)
//   scales, mins: float16 or float32 (L, N, K / 32); mins optional (an empty operand). Without
//   mins, q8 values are taken as they are and q4 values less 8 (GGUF's Q4_0: min = -8 * scale).
// The stacked weights come whole with a layer index: a layer scan then reads its layer in place
// instead of copying a slice of the stack first.
//
// Any number of rows of x: a prompt's as well as a decoding step's. Output rows are cut into
// tiles that the calling thread and XLA's intra-op pool claim one at a time; within a tile, x's
// rows go by in groups, so the tile's weights are read from memory once and from cache after.
// AVX-512 (VNNI's integer dot products for the int8 arithmetic) or AVX2 is used where the CPU
// has it (checked at run time); elsewhere a portable loop computes the same integers.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlock = 32;
// Output rows per tile: few enough that a tile's weights stay in cache while every group of
// x's rows meets them, enough to pay for claiming it.
constexpr int64_t kTileRows = 32;

struct ActivationBlocks {
  std::vector<int8_t> quants;  // (M, K)
  std::vector<float> scales;   // (M, K / 32)
  std::vector<int32_t> sums;   // (M, K / 32): sum of each block's quants (for the mins)
};

ActivationBlocks QuantizeRows(const float* x, int64_t rows, int64_t width) {
  const int64_t blocks = width / kBlock;
  ActivationBlocks out{std::vector<int8_t>(rows * width), std::vector<float>(rows * blocks),
                       std::vector<int32_t>(rows * blocks)};
  for (int64_t i = 0; i < rows * blocks; ++i) {
    const float* from = x + i * kBlock;
    float amax = 0.f;
    for (int64_t j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(from[j]));
    const float scale = amax / 127.f;
    const float inverse = scale > 0.f ? 1.f / scale : 0.f;
    int32_t sum = 0;
    for (int64_t j = 0; j < kBlock; ++j) {
      const int8_t q = static_cast<int8_t>(std::nearbyint(from[j] * inverse));
      out.quants[i * kBlock + j] = q;
      sum += q;
    }
    out.scales[i] = scale;
    out.sums[i] = sum;
  }
  return out;
}

float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  int32_t exponent = (h >> 10) & 0x1f;
  uint32_t mantissa = h & 0x3ff;
  uint32_t bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000 | (mantissa << 13);
  } else if (exponent == 0) {
    if (mantissa == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      exponent = 1;
      while (!(mantissa & 0x400)) {
        mantissa <<= 1;
        --exponent;
      }
      mantissa &= 0x3ff;
      bits = sign | static_cast<uint32_t>(exponent + 112) << 23 | (mantissa << 13);
    }
  } else {
    bits = sign | static_cast<uint32_t>(exponent + 112) << 23 | (mantissa << 13);
  }
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

template <typename Scale>
float ScaleAt(const Scale* scales, int64_t i) {
  if constexpr (std::is_same_v<Scale, float>) {
    return scales[i];
  } else {
    return HalfToFloat(scales[i]);
  }
}

// The integer dot of one weight block with one activation block, portable.
template <bool kNibbles>
int32_t BlockDotPortable(const uint8_t* weights, const int8_t* x) {
  int32_t sum = 0;
  if constexpr (kNibbles) {
    for (int64_t j = 0; j < kBlock / 2; ++j) {
      sum += static_cast<int32_t>(weights[j] & 0x0f) * x[j];
      sum += static_cast<int32_t>(weights[j] >> 4) * x[j + kBlock / 2];
    }
  } else {
    const int8_t* w = reinterpret_cast<const int8_t*>(weights);
    for (int64_t j = 0; j < kBlock; ++j) sum += static_cast<int32_t>(w[j]) * x[j];
  }
  return sum;
}

__attribute__((target("avx2,fma"))) inline __m256i BlockDotAvx2(const uint8_t* weights,
                                                                 const int8_t* x,
                                                                 bool nibbles) {
  const __m256i activations = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  const __m256i ones = _mm256_set1_epi16(1);
  if (nibbles) {  // unsigned 0..15 against signed bytes: maddubs takes them as they are
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(weights));
    const __m128i mask = _mm_set1_epi8(0x0f);
    const __m256i values = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), mask),
                                            _mm_and_si128(packed, mask));
    return _mm256_madd_epi16(_mm256_maddubs_epi16(values, activations), ones);
  }
  // signed x signed: |w| (unsigned) against x carrying w's sign, as llama.cpp does.
  const __m256i values = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(weights));
  const __m256i magnitudes = _mm256_sign_epi8(values, values);
  const __m256i signed_x = _mm256_sign_epi8(activations, values);
  return _mm256_madd_epi16(_mm256_maddubs_epi16(magnitudes, signed_x), ones);
}

__attribute__((target("avx2,fma"))) inline float HorizontalSum(__m256 v) {
  const __m128 pairs = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 twos = _mm_add_ps(pairs, _mm_movehl_ps(pairs, pairs));
  return _mm_cvtss_f32(_mm_add_ss(twos, _mm_shuffle_ps(twos, twos, 1)));
}

struct Problem {
  const uint8_t* quants;  // this layer's (N, row_bytes)
  const void* scales;     // this layer's (N, K / 32)
  const void* mins;       // or nullptr
  const float* x;         // (M, K)
  const ActivationBlocks* x_blocks;  // int8 arithmetic: x quantized, or nullptr
  float* y;                          // (M, N)
  int64_t rows, width, outputs;
  bool nibbles;
};

// A problem's weights as one arithmetic reads them.
template <typename Scale>
struct Weights {
  explicit Weights(const Problem& p)
      : blocks(p.width / kBlock),
        block_bytes(p.nibbles ? kBlock / 2 : kBlock),
        offset(p.nibbles && p.mins == nullptr),
        scales(static_cast<const Scale*>(p.scales)),
        mins(static_cast<const Scale*>(p.mins)) {}
  const uint8_t* block(const Problem& p, int64_t n, int64_t b) const {
    return p.quants + (n * blocks + b) * block_bytes;
  }
  bool has_min() const { return mins != nullptr || offset; }
  // Block `at`'s min, given its scale: stored, or Q4_0's implicit -8 * scale, or none.
  template <float (*Read)(const Scale*, int64_t)>
  float min(int64_t at, float scale) const {
    if (mins != nullptr) return Read(mins, at);
    return offset ? -8.f * scale : 0.f;
  }
  int64_t blocks, block_bytes;
  bool offset;
  const Scale* scales;
  const Scale* mins;
};

// Output rows [first, last) of y, for every row of x.
template <typename Scale>
void RowsPortable(const Problem& p, int64_t first, int64_t last) {
  const Weights<Scale> w(p);
  for (int64_t n = first; n < last; ++n) {
    for (int64_t m = 0; m < p.rows; ++m) {
      const int8_t* xq = p.x_blocks->quants.data() + m * p.width;
      const float* xd = p.x_blocks->scales.data() + m * w.blocks;
      float acc = 0.f;
      for (int64_t b = 0; b < w.blocks; ++b) {
        const uint8_t* block = w.block(p, n, b);
        const int32_t dot = p.nibbles ? BlockDotPortable<true>(block, xq + b * kBlock)
                                      : BlockDotPortable<false>(block, xq + b * kBlock);
        const int64_t at = n * w.blocks + b;
        const float scale = ScaleAt(w.scales, at);
        float term = scale * static_cast<float>(dot);
        if (w.has_min()) {
          term += w.template min<ScaleAt<Scale>>(at, scale) *
                  static_cast<float>(p.x_blocks->sums[m * w.blocks + b]);
        }
        acc += xd[b] * term;
      }
      p.y[m * p.outputs + n] = acc;
    }
  }
}

template <typename Scale>
__attribute__((target("avx2,fma,f16c"))) inline float ScaleAtF16c(const Scale* scales, int64_t i) {
  if constexpr (std::is_same_v<Scale, float>) {
    return scales[i];
  } else {
    return _cvtsh_ss(scales[i]);
  }
}

// The exact arithmetic: each weight block dequantized (q * scale + min), then dotted with x.
template <typename Scale>
void ExactRowsPortable(const Problem& p, int64_t first, int64_t last) {
  const Weights<Scale> w(p);
  float values[kBlock];
  for (int64_t n = first; n < last; ++n) {
    for (int64_t m = 0; m < p.rows; ++m) p.y[m * p.outputs + n] = 0.f;
    for (int64_t b = 0; b < w.blocks; ++b) {
      const uint8_t* block = w.block(p, n, b);
      const float scale = ScaleAt(w.scales, n * w.blocks + b);
      const float min = w.template min<ScaleAt<Scale>>(n * w.blocks + b, scale);
      for (int64_t j = 0; j < kBlock; ++j) {
        const float q = p.nibbles
                            ? static_cast<float>(j < kBlock / 2 ? block[j] & 0x0f
                                                                : block[j - kBlock / 2] >> 4)
                            : static_cast<float>(reinterpret_cast<const int8_t*>(block)[j]);
        values[j] = std::fma(q, scale, min);
      }
      for (int64_t m = 0; m < p.rows; ++m) {
        const float* x = p.x + m * p.width + b * kBlock;
        float dot = 0.f;
        for (int64_t j = 0; j < kBlock; ++j) dot += values[j] * x[j];
        p.y[m * p.outputs + n] += dot;
      }
    }
  }
}

// One block of 32 weights as four vectors of 8 floats.
__attribute__((target("avx2,fma"))) inline void WidenBlock(const uint8_t* block, bool nibbles,
                                                           __m256 out[4]) {
  __m128i low, high;  // values 0..15 and 16..31 of the block, as bytes
  if (nibbles) {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block));
    const __m128i mask = _mm_set1_epi8(0x0f);
    low = _mm_and_si128(packed, mask);
    high = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
    out[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(low));
    out[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(low, 8)));
    out[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(high));
    out[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(high, 8)));
    return;
  }
  low = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block));
  high = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 16));
  out[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(low));
  out[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(low, 8)));
  out[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(high));
  out[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(high, 8)));
}

// Rows of x in groups of this many: each widened weight block serves the whole group.
constexpr int64_t kRowGroup = 8;
// Blocks of inputs per chunk: a group's x over one chunk (8 rows x 512 floats) stays in L1
// while every output row of the tile passes over it, instead of streaming from L2 per row.
constexpr int64_t kChunkBlocks = 16;

// Output rows [first, last) (at most a tile) against kRows rows of x from `group` on. Each
// weight block is widened and dequantized (q * scale + min) in registers once for the group.
// The inputs go by in chunks; each (output row, x row)'s sum is carried across chunks in
// `partial`. A single row of x splits its sum over independent accumulators (one chain would
// wait on each FMA's latency), and takes all the inputs in one chunk (x is small).
template <typename Scale, int kRows>
__attribute__((target("avx2,fma,f16c"))) void ExactTileAvx2(const Problem& p,
                                                             const Weights<Scale>& weights,
                                                             int64_t group, int64_t first,
                                                             int64_t last) {
  constexpr int kSplit = kRows == 1 ? 4 : (kRows == 2 ? 2 : 1);
  __m256 partial[kTileRows][kRows][kSplit];
  for (int64_t n = first; n < last; ++n) {
    for (int r = 0; r < kRows; ++r) {
      for (int k = 0; k < kSplit; ++k) partial[n - first][r][k] = _mm256_setzero_ps();
    }
  }
  const float* x = p.x + group * p.width;
  const int64_t chunk_blocks = kRows == 1 ? weights.blocks : kChunkBlocks;
  for (int64_t chunk = 0; chunk < weights.blocks; chunk += chunk_blocks) {
    const int64_t chunk_end = std::min(weights.blocks, chunk + chunk_blocks);
    for (int64_t n = first; n < last; ++n) {
      __m256 totals[kRows][kSplit];
      std::memcpy(totals, partial[n - first], sizeof(totals));
      for (int64_t b = chunk; b < chunk_end; ++b) {
        __m256 w[4];
        WidenBlock(weights.block(p, n, b), p.nibbles, w);
        const int64_t at = n * weights.blocks + b;
        const float scale_at = ScaleAtF16c(weights.scales, at);
        const __m256 scale = _mm256_set1_ps(scale_at);
        const __m256 min =
            _mm256_set1_ps(weights.template min<ScaleAtF16c<Scale>>(at, scale_at));
        for (int k = 0; k < 4; ++k) w[k] = _mm256_fmadd_ps(w[k], scale, min);
        for (int r = 0; r < kRows; ++r) {
          const float* row = x + r * p.width + b * kBlock;
          for (int k = 0; k < 4; ++k) {
            __m256& total = totals[r][k % kSplit];
            total = _mm256_fmadd_ps(w[k], _mm256_loadu_ps(row + 8 * k), total);
          }
        }
      }
      std::memcpy(partial[n - first], totals, sizeof(totals));
    }
  }
  for (int64_t n = first; n < last; ++n) {
    for (int r = 0; r < kRows; ++r) {
      __m256 total = partial[n - first][r][0];
      for (int k = 1; k < kSplit; ++k) total = _mm256_add_ps(total, partial[n - first][r][k]);
      p.y[(group + r) * p.outputs + n] = HorizontalSum(total);
    }
  }
}

// Output rows [first, last), at most a tile, for every row of x.
template <typename Scale>
__attribute__((target("avx2,fma,f16c"))) void ExactRowsAvx2(const Problem& p, int64_t first,
                                                              int64_t last) {
  const Weights<Scale> weights(p);
  for (int64_t group = 0; group < p.rows; group += kRowGroup) {
    switch (std::min(kRowGroup, p.rows - group)) {  // a constant: accumulators in registers
      case 8: ExactTileAvx2<Scale, 8>(p, weights, group, first, last); break;
      case 7: ExactTileAvx2<Scale, 7>(p, weights, group, first, last); break;
      case 6: ExactTileAvx2<Scale, 6>(p, weights, group, first, last); break;
      case 5: ExactTileAvx2<Scale, 5>(p, weights, group, first, last); break;
      case 4: ExactTileAvx2<Scale, 4>(p, weights, group, first, last); break;
      case 3: ExactTileAvx2<Scale, 3>(p, weights, group, first, last); break;
      case 2: ExactTileAvx2<Scale, 2>(p, weights, group, first, last); break;
      default: ExactTileAvx2<Scale, 1>(p, weights, group, first, last); break;
    }
  }
}

// The exact arithmetic on AVX-512: a block of 32 is two vectors of 16 floats, and two output
// rows go together, so each load of x serves both. Otherwise as ExactTileAvx2.
__attribute__((target("avx512f"))) inline void WidenBlock512(const uint8_t* block, bool nibbles,
                                                             __m512 out[2]) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block));
  if (nibbles) {
    const __m128i mask = _mm_set1_epi8(0x0f);
    out[0] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(bytes, mask)));
    out[1] = _mm512_cvtepi32_ps(
        _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask)));
    return;
  }
  const __m128i high = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 16));
  out[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
  out[1] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(high));
}

// Accumulators per (output row, x row): one row of x sums its two halves apart.
template <int kRows>
constexpr int kSplit512 = kRows == 1 ? 2 : 1;

template <typename Scale, int kRows, int kPair>
__attribute__((target("avx512f,f16c,fma"))) inline void ExactRowsOf512(
    const Problem& p, const Weights<Scale>& weights, const float* x, int64_t n, int64_t chunk,
    int64_t chunk_end, __m512 (*partial)[kRows][kSplit512<kRows>]) {
  constexpr int kSplit = kSplit512<kRows>;
  __m512 totals[kPair][kRows][kSplit];
  for (int j = 0; j < kPair; ++j) std::memcpy(totals[j], partial[j], sizeof(totals[j]));
  for (int64_t b = chunk; b < chunk_end; ++b) {
    __m512 w[kPair][2];
    for (int j = 0; j < kPair; ++j) {
      WidenBlock512(weights.block(p, n + j, b), p.nibbles, w[j]);
      const int64_t at = (n + j) * weights.blocks + b;
      const float scale_at = ScaleAtF16c(weights.scales, at);
      const __m512 scale = _mm512_set1_ps(scale_at);
      const __m512 min = _mm512_set1_ps(weights.template min<ScaleAtF16c<Scale>>(at, scale_at));
      w[j][0] = _mm512_fmadd_ps(w[j][0], scale, min);
      w[j][1] = _mm512_fmadd_ps(w[j][1], scale, min);
    }
    for (int r = 0; r < kRows; ++r) {
      const float* row = x + r * p.width + b * kBlock;
      const __m512 x0 = _mm512_loadu_ps(row), x1 = _mm512_loadu_ps(row + 16);
      for (int j = 0; j < kPair; ++j) {
        totals[j][r][0] = _mm512_fmadd_ps(w[j][0], x0, totals[j][r][0]);
        totals[j][r][kSplit - 1] = _mm512_fmadd_ps(w[j][1], x1, totals[j][r][kSplit - 1]);
      }
    }
  }
  for (int j = 0; j < kPair; ++j) std::memcpy(partial[j], totals[j], sizeof(totals[j]));
}

template <typename Scale, int kRows>
__attribute__((target("avx512f,f16c,fma"))) void ExactTileAvx512(const Problem& p,
                                                                 const Weights<Scale>& weights,
                                                                 int64_t group, int64_t first,
                                                                 int64_t last) {
  constexpr int kSplit = kSplit512<kRows>;
  __m512 partial[kTileRows][kRows][kSplit];
  for (int64_t n = first; n < last; ++n) {
    for (int r = 0; r < kRows; ++r) {
      for (int k = 0; k < kSplit; ++k) partial[n - first][r][k] = _mm512_setzero_ps();
    }
  }
  const float* x = p.x + group * p.width;
  const int64_t chunk_blocks = kRows == 1 ? weights.blocks : kChunkBlocks;
  for (int64_t chunk = 0; chunk < weights.blocks; chunk += chunk_blocks) {
    const int64_t chunk_end = std::min(weights.blocks, chunk + chunk_blocks);
    int64_t n = first;
    for (; n + 1 < last; n += 2) {
      ExactRowsOf512<Scale, kRows, 2>(p, weights, x, n, chunk, chunk_end, &partial[n - first]);
    }
    if (n < last) {
      ExactRowsOf512<Scale, kRows, 1>(p, weights, x, n, chunk, chunk_end, &partial[n - first]);
    }
  }
  for (int64_t n = first; n < last; ++n) {
    for (int r = 0; r < kRows; ++r) {
      __m512 total = partial[n - first][r][0];
      if (kSplit == 2) total = _mm512_add_ps(total, partial[n - first][r][kSplit - 1]);
      p.y[(group + r) * p.outputs + n] = _mm512_reduce_add_ps(total);
    }
  }
}

template <typename Scale>
__attribute__((target("avx512f,f16c,fma"))) void ExactRowsAvx512(const Problem& p,
                                                                 int64_t first, int64_t last) {
  const Weights<Scale> weights(p);
  for (int64_t group = 0; group < p.rows; group += kRowGroup) {
    switch (std::min(kRowGroup, p.rows - group)) {  // a constant: accumulators in registers
      case 8: ExactTileAvx512<Scale, 8>(p, weights, group, first, last); break;
      case 7: ExactTileAvx512<Scale, 7>(p, weights, group, first, last); break;
      case 6: ExactTileAvx512<Scale, 6>(p, weights, group, first, last); break;
      case 5: ExactTileAvx512<Scale, 5>(p, weights, group, first, last); break;
      case 4: ExactTileAvx512<Scale, 4>(p, weights, group, first, last); break;
      case 3: ExactTileAvx512<Scale, 3>(p, weights, group, first, last); break;
      case 2: ExactTileAvx512<Scale, 2>(p, weights, group, first, last); break;
      default: ExactTileAvx512<Scale, 1>(p, weights, group, first, last); break;
    }
  }
}

template <typename Scale>
__attribute__((target("avx2,fma,f16c"))) void RowsAvx2(const Problem& p, int64_t first,
                                                         int64_t last) {
  const Weights<Scale> w(p);
  for (int64_t n = first; n < last; ++n) {
    for (int64_t m = 0; m < p.rows; ++m) {
      const int8_t* xq = p.x_blocks->quants.data() + m * p.width;
      const float* xd = p.x_blocks->scales.data() + m * w.blocks;
      __m256 acc = _mm256_setzero_ps();
      float min_acc = 0.f;
      for (int64_t b = 0; b < w.blocks; ++b) {
        const __m256i dot = BlockDotAvx2(w.block(p, n, b), xq + b * kBlock, p.nibbles);
        const int64_t at = n * w.blocks + b;
        const float scale_at = ScaleAtF16c(w.scales, at);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(scale_at * xd[b]), acc);
        if (w.has_min()) {
          min_acc += w.template min<ScaleAtF16c<Scale>>(at, scale_at) * xd[b] *
                     static_cast<float>(p.x_blocks->sums[m * w.blocks + b]);
        }
      }
      p.y[m * p.outputs + n] = HorizontalSum(acc) + min_acc;
    }
  }
}

// `count` block scales as floats.
template <typename Scale>
__attribute__((target("avx512f"))) void RowScales(const Scale* scales, int64_t count,
                                                  float* out) {
  if constexpr (std::is_same_v<Scale, float>) {
    std::memcpy(out, scales, count * sizeof(float));
  } else {
    int64_t i = 0;
    for (; i + 16 <= count; i += 16) {
      const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + i));
      _mm512_storeu_ps(out + i, _mm512_cvtph_ps(half));
    }
    for (; i < count; ++i) out[i] = HalfToFloat(scales[i]);
  }
}

__attribute__((target("sse2"))) inline __m128 TwoFloats(const float* from) {
  return _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(from)));
}

// A row's dot product of two float vectors of `count`.
__attribute__((target("avx512f"))) float Dot(const float* a, const float* b, int64_t count) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  }
  float sum = _mm512_reduce_add_ps(acc);
  for (; i < count; ++i) sum += a[i] * b[i];
  return sum;
}

// One row of x for the VNNI loop. For q4 weights its values are reordered, two blocks per 64
// bytes, as the weights unpack without crossing lanes: a pair's packed bytes give their low
// nibbles (values 0..15 of both blocks), then their high ones (16..31), so x becomes [block 0's
// 0..15, block 1's 0..15, block 0's 16..31, block 1's 16..31]. `block_sums` is each block's
// scale times the sum of its quants: a min's (or Q4_0's -8 * scale's) factor in the row's sum.
struct VnniRow {
  std::vector<int8_t> x;  // (K,), reordered for q4
  std::vector<float> block_sums;  // (K / 32,)
};

__attribute__((target("avx512f,avx512bw"))) void PrepareRow(const int8_t* xq, const float* xd,
                                                            const int32_t* sums, int64_t width,
                                                            bool nibbles, VnniRow& row) {
  const __m512i nibble_order = _mm512_set_epi64(7, 6, 3, 2, 5, 4, 1, 0);
  const int64_t blocks = width / kBlock;
  row.x.assign(xq, xq + width);
  if (nibbles) {
    for (int64_t pair = 0; pair < blocks / 2; ++pair) {
      int8_t* at = row.x.data() + pair * 2 * kBlock;
      _mm512_storeu_si512(at, _mm512_permutexvar_epi64(nibble_order, _mm512_loadu_si512(at)));
    }
  }
  row.block_sums.resize(blocks);
  for (int64_t b = 0; b < blocks; ++b) row.block_sums[b] = xd[b] * static_cast<float>(sums[b]);
}

// The int8 arithmetic with AVX-512 VNNI: two blocks per step, their 64 byte products summed
// into 16 int32 lanes by one vpdpbusd (unsigned weights against signed x), as llama.cpp's CPU
// backend does.
template <typename Scale>
__attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma,f16c"))) void RowsVnni(
    const Problem& p, int64_t first, int64_t last) {
  const Weights<Scale> w(p);
  const int64_t pairs = w.blocks / 2;
  const __m512i zero = _mm512_setzero_si512(), low_nibbles = _mm512_set1_epi8(0x0f);
  // A pair's scales (a, b) over its lanes: q8 [a x 8, b x 8]; q4 (reordered) [a, b, a, b] x 4.
  const __m512i lanes =
      p.nibbles ? _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0)
                : _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  std::vector<float> row_scales(w.blocks), row_mins(w.mins != nullptr ? w.blocks : 0);
  VnniRow row;
  for (int64_t m = 0; m < p.rows; ++m) {
    const float* xd = p.x_blocks->scales.data() + m * w.blocks;
    PrepareRow(p.x_blocks->quants.data() + m * p.width, xd,
               p.x_blocks->sums.data() + m * w.blocks, p.width, p.nibbles, row);
    for (int64_t n = first; n < last; ++n) {
      RowScales(w.scales + n * w.blocks, w.blocks, row_scales.data());
      __m512 acc = _mm512_setzero_ps();
      for (int64_t pair = 0; pair < pairs; ++pair) {
        const int64_t b = 2 * pair;
        const uint8_t* block = w.block(p, n, b);
        __m512i x = _mm512_loadu_si512(row.x.data() + b * kBlock), values;
        if (p.nibbles) {
          const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block));
          const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(packed),
                                                  _mm256_srli_epi16(packed, 4), 1);
          values = _mm512_and_si512(both, low_nibbles);
        } else {  // signed weights: x takes their signs, the weights their magnitudes
          const __m512i signed_values = _mm512_loadu_si512(block);
          x = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(signed_values), zero, x);
          values = _mm512_abs_epi8(signed_values);
        }
        const __m512i dot = _mm512_dpbusd_epi32(zero, values, x);
        const __m128 scales = _mm_mul_ps(TwoFloats(row_scales.data() + b), TwoFloats(xd + b));
        const __m512 scale = _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(scales));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc);
      }
      float sum = _mm512_reduce_add_ps(acc);
      if (w.blocks % 2) {  // an odd last block, in x's own order
        const int64_t b = w.blocks - 1;
        const int8_t* xq = p.x_blocks->quants.data() + m * p.width;
        const __m256i dot = BlockDotAvx2(w.block(p, n, b), xq + b * kBlock, p.nibbles);
        sum += HorizontalSum(_mm256_cvtepi32_ps(dot)) * row_scales[b] * xd[b];
      }
      if (w.offset) sum -= 8.f * Dot(row_scales.data(), row.block_sums.data(), w.blocks);
      if (w.mins != nullptr) {
        RowScales(w.mins + n * w.blocks, w.blocks, row_mins.data());
        sum += Dot(row_mins.data(), row.block_sums.data(), w.blocks);
      }
      p.y[m * p.outputs + n] = sum;
    }
  }
}

// The instruction sets the kernel has paths for, in order; the CPU's best one runs. VNNI adds
// the int8 arithmetic's integer dot products to AVX-512's (the exact arithmetic is AVX-512's).
enum Path : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Vnni = 3 };

int BestPath() {
  static const int best = [] {
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
          __builtin_cpu_supports("f16c"))) {
      return kPortable;
    }
    if (!__builtin_cpu_supports("avx512f")) return kAvx2;
    const bool vnni =
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
    return vnni ? kAvx512Vnni : kAvx512;
  }();
  return best;
}

std::atomic<int> path_limit(kAvx512Vnni);  // for tests: a lesser path on any CPU

int ChosenPath() { return std::min(BestPath(), path_limit.load(std::memory_order_relaxed)); }

// Output rows [first, last) of y, by the problem's arithmetic on this CPU.
template <typename Scale>
void Rows(const Problem& p, int64_t first, int64_t last) {
  const int path = ChosenPath();
  if (p.x_blocks != nullptr) {  // int8 activations: AVX2 serves AVX-512 CPUs without VNNI
    if (path == kAvx512Vnni) {
      RowsVnni<Scale>(p, first, last);
    } else {
      path >= kAvx2 ? RowsAvx2<Scale>(p, first, last) : RowsPortable<Scale>(p, first, last);
    }
  } else if (path >= kAvx512) {
    ExactRowsAvx512<Scale>(p, first, last);
  } else {
    path == kAvx2 ? ExactRowsAvx2<Scale>(p, first, last)
                  : ExactRowsPortable<Scale>(p, first, last);
  }
}

// The output rows' tiles, shared by the threads that take part in one call.
struct TileQueue {
  explicit TileQueue(int64_t count) : tiles(count) {}
  const int64_t tiles;
  std::atomic<int64_t> next{0};     // the next tile to claim
  std::atomic<int64_t> working{0};  // pool threads that may still claim one
};

// Claims tiles until none is left. Sequentially consistent: a pool thread that enters after
// the caller's last claim (and after it stopped waiting) finds none and touches nothing else.
template <typename Scale>
void ClaimTiles(const Problem& p, TileQueue& queue) {
  for (int64_t t = queue.next.fetch_add(1); t < queue.tiles; t = queue.next.fetch_add(1)) {
    Rows<Scale>(p, t * kTileRows, std::min(p.outputs, (t + 1) * kTileRows));
  }
}

// The calling thread and XLA's pool threads claim tiles one at a time: a thread that runs late
// (or is woken late) takes fewer. The caller waits only for pool threads that started: XLA may
// run this call on a pool thread while others run other calls, so a scheduled task may start
// only after this call has returned (it then finds no tile: the queue outlives the call).
template <typename Scale>
void RunTiles(const Problem& p, ffi::ThreadPool* pool) {
  const auto queue = std::make_shared<TileQueue>((p.outputs + kTileRows - 1) / kTileRows);
  const int64_t helpers =
      std::min<int64_t>(pool != nullptr ? pool->num_threads() : 0, queue->tiles - 1);
  for (int64_t t = 0; t < helpers; ++t) {
    pool->Schedule([queue, p] {  // p by value: its buffers are read only while tiles remain
      queue->working.fetch_add(1);
      ClaimTiles<Scale>(p, *queue);
      queue->working.fetch_sub(1);
    });
  }
  ClaimTiles<Scale>(p, *queue);
  while (queue->working.load() > 0) std::this_thread::yield();
}

ffi::Error MatVec(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer quants,
                  ffi::AnyBuffer scales, ffi::AnyBuffer mins, ffi::Buffer<ffi::S32> layer,
                  ffi::ResultBuffer<ffi::F32> y, bool int8_activations) {
  const auto x_dims = x.dimensions();
  const auto w_dims = quants.dimensions();
  if (x_dims.size() != 2 || w_dims.size() != 3) {
    return ffi::Error::InvalidArgument("qmatvec: x must be (M, K) and quants (L, N, bytes)");
  }
  const int64_t rows = x_dims[0], width = x_dims[1];
  const int64_t layers = w_dims[0], outputs = w_dims[1];
  const bool nibbles = quants.element_type() == ffi::U8;
  if (width % kBlock != 0 || w_dims[2] != (nibbles ? width / 2 : width)) {
    return ffi::Error::InvalidArgument("qmatvec: K must be a multiple of 32 matching the quants");
  }
  const int32_t index = *layer.typed_data();
  if (index < 0 || index >= layers) {
    return ffi::Error::InvalidArgument("qmatvec: layer index out of range");
  }
  const int64_t scale_size = ffi::ByteWidth(scales.element_type());
  const int64_t per_layer_scales = outputs * (width / kBlock);
  const bool has_mins = mins.element_count() != 0;
  const uint8_t* layer_quants =
      static_cast<const uint8_t*>(quants.untyped_data()) + index * outputs * w_dims[2];
  const uint8_t* layer_scales =
      static_cast<const uint8_t*>(scales.untyped_data()) + index * per_layer_scales * scale_size;
  const uint8_t* layer_mins = has_mins ? static_cast<const uint8_t*>(mins.untyped_data()) +
                                             index * per_layer_scales * scale_size
                                       : nullptr;
  // The int8 arithmetic takes x quantized.
  const ActivationBlocks activations =
      int8_activations ? QuantizeRows(x.typed_data(), rows, width) : ActivationBlocks();
  const Problem problem{layer_quants,
                        layer_scales,
                        layer_mins,
                        x.typed_data(),
                        int8_activations ? &activations : nullptr,
                        y->typed_data(),
                        rows,
                        width,
                        outputs,
                        nibbles};
  if (scales.element_type() == ffi::F32) {
    RunTiles<float>(problem, &pool);
  } else {
    RunTiles<uint16_t>(problem, &pool);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ScanlabQMatVec, MatVec,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("int8_activations"));

// Which path `Rows` takes on this CPU, for scanlab to report; and a switch to the portable one.
extern "C" int scanlab_qmatvec_best_path() { return BestPath(); }
extern "C" int scanlab_qmatvec_path() { return ChosenPath(); }
extern "C" void scanlab_qmatvec_limit_path(int path) { path_limit.store(path); }
