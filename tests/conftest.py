import jax

# Implicit rank promotion hides shape bugs (a (H,) carry silently broadcast against (B, H)):
# make it an error in every test, as equinox does.
jax.config.update("jax_numpy_rank_promotion", "raise")
