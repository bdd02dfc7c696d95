"""The HTTP API as clients use it: the official `openai` package (streamed and not), raw requests
for what that client cannot send, several clients at once, and every bad request refused with
OpenAI's error body naming the field, the engine untouched.

Each server runs in this process (`serve.running`: uvicorn in a thread, on a free port) over a tiny model whose
answers are compared with `generate` decoding the same prompt alone.
"""

import dataclasses
import json
import threading
import time
import urllib.error
import urllib.request

import jax
import openai
import pytest
from tests.serve.alone import alone
from tests.tiny import CHAT_TEMPLATE, TINY, tiny_tokenizer

from scanlab.decoder import Model, init_params
from scanlab.serve import Engine, running

pytestmark = pytest.mark.slow  # HTTP servers on sockets: not in `make test-fast`

KEY = "secret"
NAME = "tiny-chat"
# ChatML, refusing roles it does not know as many chat templates do (through raise_exception).
STRICT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}{% endfor %}" + CHAT_TEMPLATE
)
QUESTION = [{"role": "user", "content": "What is 1 + 1?"}]


@pytest.fixture(scope="module")
def model() -> Model:
    config = dataclasses.replace(TINY, max_seq_len=512)
    tokenizer = dataclasses.replace(tiny_tokenizer(), chat_template=STRICT_TEMPLATE)
    return Model(config, init_params(config, jax.random.PRNGKey(0)), tokenizer)


@pytest.fixture(scope="module")
def engine(model) -> Engine:
    return Engine(model, slots=2, context=512, steps=2, queue_size=4).start()


@pytest.fixture(scope="module")
def url(engine):
    with running(engine, NAME, api_key=KEY) as url:
        yield url


@pytest.fixture
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)


def greedy_text(model: Model, prompt: list[int], budget: int) -> str:
    """The answer `generate` gives the prompt alone, as text."""
    return model.tokenizer.decode(alone(model, prompt, budget))


def chat_ids(model: Model, messages) -> list[int]:
    tokenizer = model.tokenizer
    return tokenizer.encode(tokenizer.chat(messages), add_special_tokens=False)


def post(url: str, path: str, body: bytes | dict, key: str | None = KEY):
    """(status, headers, JSON body) of a raw POST."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, error.headers, json.load(error)


def test_a_chat_answer_is_generate_s_for_the_rendered_conversation(client, model):
    answer = client.chat.completions.create(
        model=NAME, messages=QUESTION, max_tokens=12, temperature=0
    )
    prompt = chat_ids(model, QUESTION)
    choice = answer.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == greedy_text(model, prompt, 12)
    assert choice.finish_reason == "length"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(prompt), 12)
    assert answer.object == "chat.completion" and answer.model == NAME


def test_a_streamed_answer_is_the_same_text_in_chunks(client, model):
    chunks = list(
        client.chat.completions.create(
            model=NAME,
            messages=QUESTION,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == greedy_text(model, chat_ids(model, QUESTION), 12)
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_a_completion_continues_the_text(client, model):
    prompt = "Scan the layers"
    answer = client.completions.create(model=NAME, prompt=prompt, max_tokens=9, temperature=0)
    ids = model.tokenizer.encode(prompt)
    assert answer.choices[0].text == greedy_text(model, ids, 9)
    streamed = client.completions.create(
        model=NAME, prompt=prompt, max_tokens=9, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in streamed) == answer.choices[0].text


def test_a_stop_string_ends_the_answer_before_it(client, model):
    whole = greedy_text(model, chat_ids(model, QUESTION), 24)
    stop = whole[5:8]
    for stream in (False, True):
        answer = client.chat.completions.create(
            model=NAME, messages=QUESTION, max_tokens=24, temperature=0, stop=[stop], stream=stream
        )
        if stream:
            chunks = list(answer)
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            text, reason = answer.choices[0].message.content, answer.choices[0].finish_reason
        assert text == whole[: whole.index(stop)] and reason == "stop"


def test_seeded_sampling_repeats_and_another_seed_differs(client):
    def ask(seed):
        return (
            client.chat.completions.create(
                model=NAME, messages=QUESTION, max_tokens=16, temperature=1.0, seed=seed
            )
            .choices[0]
            .message.content
        )

    assert ask(1) == ask(1)
    assert ask(1) != ask(2)


def test_models_health_slots_and_the_page(client, url):
    assert [m.id for m in client.models.list()] == [NAME]
    with urllib.request.urlopen(f"{url}/health") as response:  # no key needed
        assert json.load(response) == {"status": "ok"}
    with urllib.request.urlopen(f"{url}/") as response:
        page = response.read().decode()
    assert "/v1/chat/completions" in page and "<script>" in page
    request = urllib.request.Request(f"{url}/slots", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request) as response:
        stats = json.load(response)
    assert stats["slots"] == 2 and stats["queued"] == 0


MESSAGE = {"role": "user", "content": "Hi"}


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "says"),
    [
        ("/v1/chat/completions", b"{not json", 400, None, "not valid JSON"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages", "at least 1 item"),
        ("/v1/chat/completions", {}, 400, "messages", "Field required"),
        ("/v1/chat/completions", {"messages": "Hi"}, 400, "messages", "valid list"),
        (
            "/v1/chat/completions",
            {"messages": [MESSAGE], "max_tokens": "5"},
            400,
            "max_tokens",
            "valid integer",
        ),
        (
            "/v1/chat/completions",
            {"messages": [MESSAGE], "temperature": "hot"},
            400,
            "temperature",
            "valid number",
        ),
        (
            "/v1/chat/completions",
            {"messages": [MESSAGE], "max_tokens": 0},
            400,
            "max_tokens",
            "max_tokens must be >= 1, got 0",
        ),
        (
            "/v1/chat/completions",
            {"messages": [MESSAGE], "max_tokens": 600},
            400,
            "max_tokens",
            "max_tokens must be <= 496 for a prompt of",
        ),
        (
            "/v1/chat/completions",
            {"messages": [MESSAGE], "top_p": 0.0, "temperature": 1.0},
            400,
            "top_p",
            "top_p must be in (0, 1]",
        ),
        ("/v1/chat/completions", {"messages": [MESSAGE], "n": 2}, 400, "n", "Input should be 1"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "narrator", "content": "Hi"}]},
            400,
            "messages",
            "unknown role narrator",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "Uno. " * 400}]},
            400,
            "messages",
            "the prompt must be at most 511 tokens",
        ),
        (
            "/v1/chat/completions",
            {"model": "gpt-4o", "messages": [MESSAGE]},
            404,
            "model",
            "this server has 'tiny-chat', got 'gpt-4o'",
        ),
        ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt", "one prompt per request"),
        ("/v1/completions", {"prompt": 5}, 400, "prompt", "valid string"),
    ],
)
def test_bad_requests_get_openai_s_error_body_naming_the_field(
    url, engine, path, body, status, param, says
):
    finished = engine.stats().finished
    code, _, answer = post(url, path, body)
    assert code == status
    error = answer["error"]
    assert error["param"] == param and says in error["message"]
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    stats = engine.stats()
    assert (stats.finished, stats.busy, stats.queued) == (finished, 0, 0)  # untouched


@pytest.mark.parametrize("key", [None, "wrong", KEY + "x"])
def test_a_wrong_or_missing_key_is_401(url, key):
    code, _, answer = post(url, "/v1/chat/completions", {"messages": [MESSAGE]}, key=key)
    assert code == 401 and answer["error"]["type"] == "authentication_error"


def test_a_body_over_the_limit_is_413(model):
    with running(Engine(model, slots=1, context=64), NAME, max_body_bytes=1000) as url:
        big = {"messages": [{"role": "user", "content": "x" * 2000}]}
        code, _, answer = post(url, "/v1/chat/completions", big, key=None)
    assert code == 413 and "<= 1000 bytes" in answer["error"]["message"]


def test_more_requests_than_slots_and_queue_are_refused_with_retry_after(model):
    engine = Engine(model, slots=1, context=64, queue_size=1)  # not started: nothing leaves
    with running(engine, NAME) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        waiting = [
            client.chat.completions.create(model=NAME, messages=QUESTION, stream=True)
            for _ in range(2)  # the slot's and the queue's
        ]
        with pytest.raises(openai.RateLimitError) as refused:
            client.chat.completions.create(model=NAME, messages=QUESTION, stream=True)
        assert refused.value.response.headers["retry-after"] == "1"
        assert "all 1 slots are busy" in refused.value.message
        engine.close(deadline_s=0)  # the waiting streams end, cancelled
        for stream in waiting:
            assert list(stream)[-1].choices[0].finish_reason == "stop"


def test_a_client_that_goes_away_mid_stream_frees_its_slot(model):
    engine = Engine(model, slots=1, context=512, steps=1)
    engine.warm_up([32], on_compiled=lambda _: None)  # QUESTION's bucket: nothing compiles later
    engine.start()
    tickets = []
    submit = engine.submit
    engine.submit = lambda *args: tickets.append(submit(*args)) or tickets[-1]  # type: ignore[method-assign]
    with running(engine, NAME) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        stream = client.chat.completions.create(
            model=NAME, messages=QUESTION, max_tokens=480, temperature=0, stream=True
        )
        next(iter(stream))
        stream.close()
        start = time.monotonic()
        while engine.stats().busy and time.monotonic() - start < 60:  # a bound on a hang
            time.sleep(0.01)
        assert engine.stats().busy == 0
    assert tickets[0].cancelled.is_set() and tickets[0].emitted < 480


@pytest.mark.parametrize(("slots", "requests"), [(1, 3), (3, 8)])
def test_concurrent_clients_each_get_their_whole_answer(model, slots, requests):
    engine = Engine(model, slots=slots, context=128, steps=2, queue_size=requests).start()
    questions = [[{"role": "user", "content": f"Say {i}."}] for i in range(requests)]
    budgets = [8 + 3 * i for i in range(requests)]
    answers: dict[int, str] = {}
    busiest = []
    with running(engine, NAME) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)

        def ask(i):
            answers[i] = (
                client.chat.completions.create(
                    model=NAME, messages=questions[i], max_tokens=budgets[i], temperature=0
                )
                .choices[0]
                .message.content
            )

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(requests)]
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            with urllib.request.urlopen(f"{url}/slots") as response:
                busiest.append(json.load(response)["busy"])
            time.sleep(0.005)
        for thread in threads:
            thread.join()
    assert max(busiest) <= slots
    for i in range(requests):
        assert answers[i] == greedy_text(model, chat_ids(model, questions[i]), budgets[i])
