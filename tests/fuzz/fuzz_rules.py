"""blkdebug rules files (block/inject.py) and the engine they build (native/inject.c).

The bytes are the text of a rules file: parsed (``parse_rules``), and when it
parses, the engine is built and asked about a fixed mix of requests and
events, so that every rule the parser lets through is one the engine can run
(it must never crash, hang or grow without bound). RulesError is the
documented answer to a bad file.
"""
from pykvm.block.inject import EVENTS, Injector, RulesError, parse_rules

EXPECTED = (RulesError,)

REQUESTS = [("read", 0, 4096), ("write", 8 << 20, 65536), ("flush", 0, 0),
            ("discard", 1 << 30, 1 << 20), ("write-zeroes", 4096, 512), ("get-id", 0, 0)]


def one_input(data: bytes) -> None:
    rules = parse_rules(data.decode("utf-8", "replace"), "fuzz.conf")
    inj = Injector(rules)
    for i in range(24):
        op, offset, length = REQUESTS[i % len(REQUESTS)]
        hit = inj.check(op, offset, length, queue=i % 3)
        if hit is not None:
            assert hit.action in ("error", "status", "delay", "hang", "corrupt", "torn", "drop",
                                  "zero", "hold"), hit.action
            assert hit.delay_ns <= 3600 * 10**9
        if i % 5 == 0:
            inj.event(EVENTS[i % len(EVENTS)])
        inj.check("write", offset, 8, guest=False)
    inj.release()
    assert len(inj.counts()) == len(rules)
