"""Guarantee 7, bad input is refused, not fatal: garbage frames against a real node process."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import bson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker import protocol as p
from client import BrokerQueue, MessageTooLargeError
from tests.helpers.nodes import NodeProcess
from tests.helpers.raw import RawClient

E, C = p.ErrorCode, p.Command
RECEIVE_TIMEOUT_S = 5.0
BODY, EMPTY = bson.encode({"v": "hello"}), bson.encode({})
_rids = itertools.count(2_000_000_001)  # far from the rids hypothesis favours


@dataclasses.dataclass
class Stored:
    n: int
    text: str
    blob: bytes


@pytest.fixture(scope="module")
def small_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """A node that accepts message bodies of at most 2 KiB."""
    process = NodeProcess(tmp_path_factory.mktemp("small"), session_timeout="2s", max_message_bytes=2048)
    yield process.start()
    process.stop()


@pytest.fixture
def raw(node: NodeProcess) -> Iterator[RawClient]:
    """A bare DEALER on the module's node, without a session."""
    with contextlib.closing(RawClient(node.endpoint)) as client:
        yield client


def receive(raw: RawClient, node: NodeProcess, wanted: Callable[[p.NodeFrame], bool]) -> p.NodeFrame:
    """The next frame ``wanted`` accepts; fails at once when the node process has died."""
    deadline = time.monotonic() + RECEIVE_TIMEOUT_S
    while time.monotonic() < deadline:
        assert node.process and node.process.poll() is None, f"the node died:\n{node.log_text()[-3000:]}"
        if raw.socket.poll(50) and wanted(frame := p.decode_node(raw.socket.recv_multipart())):
            return frame
    raise AssertionError(f"no expected answer within {RECEIVE_TIMEOUT_S}s")


def request(raw: RawClient, node: NodeProcess, command: C, payload: dict[str, Any]) -> p.Reply | p.Error:
    rid = next(_rids)
    raw.send(command, {"rid": rid, **payload})
    answer = receive(raw, node, lambda f: isinstance(f, p.Reply | p.Error) and f.request_id == rid)
    assert isinstance(answer, p.Reply | p.Error)
    return answer


def next_answer(raw: RawClient, node: NodeProcess) -> p.NodeFrame:
    return receive(raw, node, lambda f: not isinstance(f, p.Deliver))


def admin(raw: RawClient, node: NodeProcess, op: str, **args: Any) -> dict[str, Any]:
    answer = request(raw, node, C.ADMIN, {"op": op, "args": args})
    assert isinstance(answer, p.Reply), answer
    return answer.result


def row(produce_id: str, channel: str = "bad-input/ok", body: bytes = BODY, delay_ms: int = 0) -> list[Any]:
    """A produce item: [id, channel, body, priority, delay_ms, dedup_ms, hash]."""
    return [produce_id, channel, body, 0, delay_ms, 0, None]


def nested_document(depth: int) -> bytes:
    """A BSON document nested ``depth`` levels deep, built by hand (bson.encode would recurse)."""
    doc = EMPTY
    for _ in range(depth):
        doc = struct.pack("<i", len(doc) + 8) + b"\x03a\x00" + doc + b"\x00"
    return doc


# --------------------------------------------------------------------------- strategies

no_nul = st.characters(codec="utf-8", exclude_characters="\x00")
keys = st.sampled_from(["rid", "items", "sub", "channel", "op", "args", "name", "n"]) | st.text(
    no_nul, max_size=6
)
scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | st.text(max_size=20)
garbage = st.recursive(
    scalars | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=12,
)
small = st.integers(0, 2**40)  # beyond 2**31 BSON carries int64, which decodes as bson.Int64


def pick(*choices: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Draw from one of ``choices``, each equally likely (``st.one_of`` weighs nested branches instead)."""
    return st.sampled_from(choices).flatmap(lambda strategy: strategy)


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return pick(good, good, good, bad)


@st.composite
def mutant(draw: st.DrawFn, valid: st.SearchStrategy[Any]) -> Any:
    """A valid document or row, or one with a field replaced by garbage, removed or added."""
    doc = draw(valid).copy()  # st.just() hands out the same object every time
    action = draw(st.sampled_from(["keep", "keep", "replace", "drop", "add"]))
    where = draw(st.sampled_from(list(range(len(doc))) if isinstance(doc, list) else sorted(doc) or ["rid"]))
    if action == "replace":
        doc[where] = draw(garbage)
    elif action == "drop" and doc:
        del doc[where]
    elif action == "add" and isinstance(doc, list):
        doc.append(draw(garbage))
    elif action == "add":
        doc[draw(keys)] = draw(garbage)
    return doc


def request_doc(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return mutant(st.fixed_dictionaries({"rid": st.integers(1, 2**31 - 1), **fields}))


bad_channels = st.sampled_from(["", "/a", "a//b", "a/", ".a", "a b", "é", "x" * 201]) | st.text(max_size=9)
channels = mostly(st.from_regex(r"fuzz/[a-z0-9_.:\-]{1,12}", fullmatch=True), bad_channels)
bodies = mostly(garbage.map(lambda v: bson.encode({"v": v})), st.binary(max_size=40))
hashes = st.none() | st.binary(min_size=1, max_size=256)
ids = st.text(min_size=1, max_size=64)
produce_row = st.tuples(ids, channels, bodies, small, small, small, hashes).map(list)
lease, nack = st.tuples(small, small).map(list), st.tuples(small, small, st.booleans(), st.text()).map(list)
ADMIN_OPS = [
    "ping",
    "queues",
    "stats",
    "peek",
    "dead_letters",
    "purge",
    "requeue_dead",
    "purge_dead",
    "compact",
]
REQUESTS = {
    C.HELLO: mutant(st.fixed_dictionaries({"session_timeout_ms": small, "client": st.text(max_size=200)})),
    C.HEARTBEAT: mutant(st.just({})),
    C.PRODUCE: request_doc(items=st.lists(mostly(produce_row, mutant(produce_row)), min_size=1, max_size=5)),
    C.SUBSCRIBE: request_doc(
        **dict.fromkeys(["sub", "retry_backoff_ms", "retry_backoff_max_ms", "processing_timeout_ms"], small),
        **dict(channel=channels, max_parallel=st.integers(1, 5), max_attempts=st.integers(1, 5)),
    ),
    C.UNSUBSCRIBE: request_doc(sub=small),
    C.ACK: request_doc(items=st.lists(mostly(lease, mutant(lease)), min_size=1, max_size=5)),
    C.NACK: request_doc(items=st.lists(mostly(nack, mutant(nack)), min_size=1, max_size=5)),
    C.BYE: mutant(st.just({})),
    C.ADMIN: request_doc(
        op=mostly(st.sampled_from(ADMIN_OPS), st.text(max_size=70)),
        args=mutant(st.fixed_dictionaries({"name": channels, "n": st.integers(0, 1001)})),
    ),
}
HUGE = {  # built on demand: big arrays are slow to generate, shrink and print
    "too many items": lambda: p.encode(C.PRODUCE, {"rid": 7, "items": list(range(p.MAX_BATCH_ITEMS + 1))}),
    "10k stale acks": lambda: p.encode(C.ACK, {"rid": 8, "items": [[i, i] for i in range(10_000)]}),
    "2k bad channels": lambda: p.encode(C.PRODUCE, {"rid": 9, "items": [row("h", "a b")] * 2000}),
    "50k junk ints": lambda: p.encode(C.HEARTBEAT, {"junk": list(range(50_000))}),
}
header = st.sampled_from(list(REQUESTS)).map(lambda c: p.MAGIC + bytes((1, c)))
bad_header = st.binary(max_size=8) | st.binary(min_size=2, max_size=2).map(lambda vc: p.MAGIC + vc)
# Python's recursion limit ends BSON decoding near 1000 levels, at a depth that depends on the stack.
nested = (st.integers(1, 300) | st.integers(2000, 5000)).map(nested_document)
documents = st.dictionaries(keys, garbage).map(bson.encode)
broken_frames = st.one_of(
    st.lists(st.binary(max_size=64), min_size=1, max_size=5),  # random parts
    st.tuples(bad_header, documents).map(list),  # wrong magic, version or command
    st.tuples(header, st.sampled_from([0, 2, 4])).map(lambda hn: [hn[0], *[EMPTY] * hn[1]]),  # 1, 3, 5 parts
    st.tuples(header, st.binary(max_size=64) | nested).map(list),  # not BSON, too deep
    st.tuples(header, documents).map(list),  # fields of any name and type
    st.sampled_from(sorted(HUGE)).map(lambda name: HUGE[name]()),
)
request_frames = st.sampled_from(list(REQUESTS)).flatmap(lambda c: REQUESTS[c].map(lambda d: p.encode(c, d)))
frames = pick(request_frames, broken_frames)


# --------------------------------------------------------------------------- the oracle


def decode(parts: list[bytes]) -> p.ClientFrame | p.FrameError:
    """What the protocol module makes of ``parts``."""
    try:
        return p.decode_client(parts)
    except p.FrameError as exc:
        return exc


def item_code(item: p.ProduceItem) -> E:
    """The verdict the node owes one decoded produce item (the module's node takes 16 MiB bodies)."""
    if p.channel_name_problem(item.channel) is not None:
        return E.INVALID_CHANNEL
    return E.OK if bson.is_valid(item.body) else E.INVALID_PAYLOAD


def check_answer(decoded: p.ClientFrame | p.FrameError, answer: p.NodeFrame | None) -> bool:
    """Assert ``answer`` is what the node owes a frame; True when it must count a rejection."""
    match decoded:
        case p.FrameError(code=code, request_id=rid):
            assert isinstance(answer, p.Error), f"{decoded.message} was answered with {answer}"
            assert (answer.code, answer.request_id) == (code, rid) and answer.message, answer
            return True
        case p.Bye():
            assert answer is None
        case p.Hello():
            assert isinstance(answer, p.Welcome)
        case p.Heartbeat():
            assert isinstance(answer, p.Heartbeat) or getattr(answer, "code", None) == E.SESSION_UNKNOWN
        case p.Produce(rid, items):
            assert isinstance(answer, p.Reply) and answer.request_id == rid, answer
            assert [r[2] for r in answer.result["r"]] == [item_code(item) for item in items]
            return all(item_code(item) for item in items)
        case _:
            assert isinstance(answer, p.Reply | p.Error) and answer.request_id == decoded.request_id, answer
    return False


async def produce_stored(endpoint: str, channel: str) -> dict[str, Stored]:
    async with BrokerQueue(endpoint, session_timeout="2s") as queue:
        payloads = [Stored(n, f"message {n} – ✓", bytes(range(n))) for n in range(50)]
        results = await asyncio.gather(*(queue.channel(channel, Stored).produce(one) for one in payloads))
    return {result.id: payload for result, payload in zip(results, payloads, strict=True)}


async def consume_all(endpoint: str, channel: str, count: int) -> dict[str, Stored]:
    seen: dict[str, Stored] = {}
    all_seen = asyncio.Event()

    async def handle(data: Stored, message: Any) -> None:
        seen[message.id] = data
        if len(seen) >= count:
            all_seen.set()

    async with BrokerQueue(endpoint, session_timeout="2s") as queue:
        consumer = await queue.channel(channel, Stored).consume(handle, max_parallel=16)
        await asyncio.wait_for(all_seen.wait(), 15)
        await consumer.close()
    return seen


# --------------------------------------------------------------------------- tests


@pytest.mark.timeout(110)
def test_random_and_mutated_frames_are_refused_and_stored_messages_stay_intact(
    node: NodeProcess, raw: RawClient
) -> None:
    # Given 50 stored messages on a channel no garbage frame can name, and a session for the garbage
    channel = f"stored/bad-input-{uuid.uuid4().hex}"
    stored = asyncio.run(produce_stored(node.endpoint, channel))
    assert admin(raw, node, "stats", name=channel)["stats"]["ready"] == 50
    rejected_before = admin(raw, node, "cluster_status")["counters"]["frames_rejected"]
    raw.hello(session_timeout_ms=60_000)  # so that fuzzed SUBSCRIBEs lease fuzzed messages too
    must_reject = 0

    @settings(max_examples=1000, derandomize=True, deadline=None, database=None)
    @given(parts=frames)
    def send_garbage(parts: list[bytes]) -> None:
        nonlocal must_reject
        raw.send_raw(parts)
        ping_rid = next(_rids)
        raw.send(C.ADMIN, {"rid": ping_rid, "op": "ping", "args": {}})
        answers: list[p.NodeFrame] = []
        while not (isinstance(answer := next_answer(raw, node), p.Reply) and answer.request_id == ping_rid):
            answers.append(answer)
        decoded = decode(parts)
        if not answers and not isinstance(decoded, p.Bye):  # answers after commit may come after the ping's
            answers.append(next_answer(raw, node))
        assert len(answers) <= 1, answers
        must_reject += check_answer(decoded, answers[0] if answers else None)

    # When hypothesis throws random and mutated frames at the node, each followed by a ping
    send_garbage()
    # Then every refusal was counted, and the stored messages come back whole, each exactly once
    counters = admin(raw, node, "cluster_status")["counters"]
    assert counters["frames_rejected"] - rejected_before >= must_reject > 0
    assert asyncio.run(consume_all(node.endpoint, channel, len(stored))) == stored
    stats = admin(raw, node, "stats", name=channel)["stats"]
    assert (stats["ready"], stats["in_flight"], stats["dead"], stats["acked_total"]) == (0, 0, 0, 50)


def ask(command: C, **payload: Any) -> list[bytes]:
    """A request frame with request id 42."""
    return p.encode(command, {"rid": 42, **payload})


SUBSCRIPTION = {"sub": 1, "channel": "x", "max_parallel": 1, "max_attempts": 1}
SUBSCRIPTION |= {"retry_backoff_ms": 0, "retry_backoff_max_ms": 0}
REFUSED = {  # frame parts, the code that names the problem, the request id the error carries
    "unknown command code": ([b"ZB\x01\x63", EMPTY], E.UNKNOWN_COMMAND, 0),
    "a node's command from a client": ([p.MAGIC + bytes((1, C.DELIVER)), EMPTY], E.UNKNOWN_COMMAND, 0),
    "protocol version 2": ([b"ZB\x02\x09", EMPTY], E.UNSUPPORTED_VERSION, 0),
    "wrong magic": ([b"ZQ\x01\x02", EMPTY], E.MALFORMED_FRAME, 0),
    "1 part": ([p.HEARTBEAT_FRAME[0]], E.MALFORMED_FRAME, 0),
    "3 parts": ([*p.HEARTBEAT_FRAME, EMPTY], E.MALFORMED_FRAME, 0),
    "5 parts": ([*p.HEARTBEAT_FRAME, EMPTY, EMPTY, EMPTY], E.MALFORMED_FRAME, 0),
    "payload not BSON": ([p.HEARTBEAT_FRAME[0], b"\x09\x00\x00\x00junk"], E.MALFORMED_FRAME, 0),
    "SUBSCRIBE without HELLO": (ask(C.SUBSCRIBE, **SUBSCRIPTION), E.SESSION_UNKNOWN, 42),
    "max_parallel 0": (ask(C.SUBSCRIBE, **(SUBSCRIPTION | {"max_parallel": 0})), E.INVALID_ARGUMENT, 42),
    "unknown admin op": (ask(C.ADMIN, op="frob"), E.UNKNOWN_COMMAND, 42),
    "stats of a missing queue": (ask(C.ADMIN, op="stats", args={"name": "no/q"}), E.NOT_FOUND, 42),
    "peek of a bad name": (ask(C.ADMIN, op="peek", args={"name": "a//b"}), E.INVALID_CHANNEL, 42),
    "body not binary": (ask(C.PRODUCE, items=[["i", "x", "t", 0, 0, 0, None]]), E.MALFORMED_FRAME, 42),
    "negative seq in ACK": (ask(C.ACK, items=[[-1, 1]]), E.MALFORMED_FRAME, 42),
}


@pytest.mark.parametrize(("parts", "code", "rid"), list(REFUSED.values()), ids=list(REFUSED))
def test_a_refused_frame_is_answered_with_an_error_naming_the_problem(
    node: NodeProcess, raw: RawClient, parts: list[bytes], code: E, rid: int
) -> None:
    # Given a client without a session; When it sends a frame the node must refuse
    raw.send_raw(parts)
    # Then an ERROR with the frame's request id (0 if it had none) names the problem; the node still answers
    answer = next_answer(raw, node)
    assert isinstance(answer, p.Error) and (answer.code, answer.request_id) == (code, rid), answer
    assert answer.message
    assert admin(raw, node, "ping")["node"] == node.node_id


def test_each_produce_item_is_judged_on_its_own_so_good_items_beside_bad_ones_are_stored(
    node: NodeProcess, raw: RawClient, channel_name: str
) -> None:
    # Given a batch: good, invalid channel, body that is not BSON, good
    ids = [uuid.uuid4().hex for _ in range(4)]
    batch = [row(ids[0], channel_name), row(ids[1], "a//b"), row(ids[2], channel_name, b"\x10\x00\x00\x00")]
    batch.append(row(ids[3], channel_name))
    # When it is produced
    answer = request(raw, node, C.PRODUCE, {"items": batch})
    # Then each item gets its own verdict, and exactly the good ones are stored
    assert isinstance(answer, p.Reply)
    verdicts = answer.result["r"]
    assert [r[2] for r in verdicts] == [E.OK, E.INVALID_CHANNEL, E.INVALID_PAYLOAD, E.OK]
    assert verdicts[1][3] and verdicts[2][3]
    stored = admin(raw, node, "peek", name=channel_name)["messages"]
    assert [(m["id"], m["data"]) for m in stored] == [(ids[0], "hello"), (ids[3], "hello")]


def test_ack_and_nack_of_leases_never_granted_are_answered_stale(node: NodeProcess, raw: RawClient) -> None:
    # Given no lease with these sequence numbers and tokens; When they are acked and nacked
    never = 2**31 - 1
    ack = request(raw, node, C.ACK, {"items": [[never, never], [never - 1, 7]]})
    nack = request(raw, node, C.NACK, {"items": [[never, never, False, "x"], [never - 2, 1, True, ""]]})
    # Then every item is refused as stale
    assert isinstance(ack, p.Reply) and isinstance(nack, p.Reply)
    assert ack.result["codes"] == nack.result["codes"] == [E.STALE_LEASE, E.STALE_LEASE]


def test_an_oversized_message_is_refused_while_the_rest_of_its_batch_is_stored(
    small_node: NodeProcess, channel_name: str
) -> None:
    # Given a node taking bodies of at most 2048 bytes, and bodies of exactly that and one byte more
    at_limit, over_limit = (bson.encode({"v": "x" * (size - 13)}) for size in (2048, 2049))
    assert (len(at_limit), len(over_limit)) == (2048, 2049)
    ids = [uuid.uuid4().hex for _ in range(3)]
    with contextlib.closing(RawClient(small_node.endpoint)) as raw:
        assert raw.hello().max_message_bytes == 2048
        # When one batch holds a small message, the oversized one and one at the limit
        batch = [
            row(ids[0], channel_name),
            row(ids[1], channel_name, over_limit),
            row(ids[2], channel_name, at_limit),
        ]
        answer = request(raw, small_node, C.PRODUCE, {"items": batch})
        # Then only the oversized one is refused, naming the limit, and the others are stored
        assert isinstance(answer, p.Reply)
        assert [r[2] for r in answer.result["r"]] == [E.OK, E.MESSAGE_TOO_LARGE, E.OK]
        assert "2048" in answer.result["r"][1][3]
        stored = admin(raw, small_node, "peek", name=channel_name)["messages"]
        assert [m["id"] for m in stored] == [ids[0], ids[2]]


async def test_the_client_refuses_a_message_over_the_nodes_limit_before_sending_it(
    small_node: NodeProcess, channel_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with BrokerQueue(small_node.endpoint, session_timeout="2s") as queue:
        # Given a client of the 2 KiB node that records what it hands to its connection
        sent: list[Any] = []
        enqueue = queue.connection.enqueue
        monkeypatch.setattr(queue.connection, "enqueue", lambda *a, **kw: sent.append(a) or enqueue(*a, **kw))
        channel = queue.channel(channel_name, str)
        # When a payload over the limit is produced; Then it raises and nothing was sent
        with pytest.raises(MessageTooLargeError, match="at most 2048"):
            await channel.produce("x" * 2048)
        assert sent == []
        # And a small one still goes through
        assert not (await channel.produce("fits")).duplicate
        assert len(sent) == 1


INT64_REQUESTS = {
    "request id 2**31": (C.ADMIN, {"rid": 2**31, "op": "ping", "args": {}}),
    "delay of 30 days": (C.PRODUCE, {"rid": 5, "items": [row(uuid.uuid4().hex, delay_ms=30 * 86_400_000)]}),
    "ack of seq 2**31": (C.ACK, {"rid": 6, "items": [[2**31, 1]]}),
}


@pytest.mark.parametrize(("command", "payload"), list(INT64_REQUESTS.values()), ids=list(INT64_REQUESTS))
def test_an_integer_past_32_bits_within_its_documented_range_is_accepted(
    node: NodeProcess, raw: RawClient, command: C, payload: dict[str, Any]
) -> None:
    # Given a request with an integer BSON carries as int64; When it is sent
    raw.send(command, payload)
    # Then the node answers it as it would a small one
    answer = next_answer(raw, node)
    assert isinstance(answer, p.Reply) and answer.request_id == payload["rid"], answer


def test_a_produce_id_of_64_four_byte_characters_does_not_take_the_node_down(fresh_node: NodeProcess) -> None:
    with contextlib.closing(RawClient(fresh_node.endpoint)) as raw:
        # Given a produce id within the 64-character limit but of 256 UTF-8 bytes; When it is produced
        answer = request(raw, fresh_node, C.PRODUCE, {"items": [row("\U0001f600" * 64)]})
        # Then it is refused (ids are ASCII), and the node keeps serving
        assert isinstance(answer, p.Error) and answer.code == p.ErrorCode.INVALID_ARGUMENT
        assert "ASCII" in answer.message
        assert admin(raw, fresh_node, "ping")["node"] == fresh_node.node_id
