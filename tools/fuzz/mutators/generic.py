"""Generic byte mutators, for every seed kind: bit flips, 0x00/0xFF runs, truncation, chunks duplicated or
deleted, garbage appended."""

from tools.fuzz.registry import mutator
from tools.fuzz.seeds import KINDS


@mutator("bytes", KINDS)
def bitflip(data, rng, seed):
    buf = bytearray(data)
    k = rng.randint(1, 64)
    offsets = sorted(rng.randrange(len(buf)) for _ in range(k))
    for off in offsets:
        buf[off] ^= 1 << rng.randrange(8)
    return bytes(buf), {"bits": k, "offsets": offsets[:8]}


@mutator("bytes", KINDS)
def byte_run(data, rng, seed):
    off, n, value = rng.randrange(len(data)), rng.choice([1, 4, 16, 64, 256, 4096]), rng.choice([0x00, 0xFF])
    buf = bytearray(data)
    buf[off : off + n] = bytes([value]) * len(buf[off : off + n])
    return bytes(buf), {"offset": off, "length": n, "value": value}


@mutator("bytes", KINDS)
def truncate(data, rng, seed):
    off = rng.randrange(len(data))
    return data[:off], {"at": off, "of": len(data)}


@mutator("bytes", KINDS)
def truncate_header(data, rng, seed):
    off = rng.randint(min(132, len(data) - 1), min(2048, len(data) - 1))
    return data[:off], {"at": off, "of": len(data)}


@mutator("bytes", KINDS)
def chunk_dup(data, rng, seed):
    a = rng.randrange(len(data))
    n = rng.randint(1, min(4096, len(data) - a))
    b = rng.randrange(len(data) + 1)
    return data[:b] + data[a : a + n] + data[b:], {"from": a, "length": n, "to": b}


@mutator("bytes", KINDS)
def chunk_del(data, rng, seed):
    a = rng.randrange(len(data))
    n = rng.randint(1, min(4096, len(data) - a))
    return data[:a] + data[a + n :], {"at": a, "length": n}


@mutator("bytes", KINDS)
def append_garbage(data, rng, seed):
    n = rng.choice([1, 7, 128, 4096, 65536])
    return data + rng.randbytes(n), {"length": n}


# the names above, in order: the fallback of every kind, and the inner edit of other mutators
BYTE_MUTATORS = ("bitflip", "byte_run", "truncate", "truncate_header", "chunk_dup", "chunk_del", "append_garbage")
