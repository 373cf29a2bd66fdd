"""Which replica takes a request: the least loaded one, or the one that holds the prompt's prefix.

The front of `python -m tinyllm.replicas` (replicas.py) keeps a `Replica` record for each
engine replica, counts its requests in flight and marks it down when it fails; a policy
here picks one of the replicas that are up:

- `LeastLoaded`: the fewest requests in flight, ties going to the replica that has taken
  fewer requests so far (so an idle cluster still alternates). Every replica runs the same
  continuous batching, so requests in flight is what its next step costs.
- `PrefixAffinity`: consistent hashing on the prompt's first characters. Requests that
  share a prefix (a system prompt, a few-shot preamble) land on the same replica, which is
  where a prefix cache pays off once the engine keeps one. Each replica owns many points on
  a ring of 64-bit hashes; a key goes to the first point after its own hash. Adding or
  losing one of N replicas moves only about 1/N of the keys, and a replica that Ray
  replaces keeps its name and so its points. Loads stay bounded ("consistent hashing with
  bounded loads", Mirrokni, Thorup and Zadimoghaddam, 2018): a replica already carrying
  more than `load_factor` times the mean is passed over for the next one on the ring, so
  one hot prefix cannot pin all traffic on one replica.

A policy sees only the records and a key, never Ray, so the tests drive it by hand.
`prefix_key` turns a request body into the key; a body it cannot read gives None (least
loaded), and the replica that gets it answers with the usual 400.
"""
from __future__ import annotations

import bisect
import hashlib
import math
from dataclasses import dataclass

PREFIX_CHARS = 256  # how much of a prompt names its prefix


@dataclass
class Replica:
    """The front's view of one engine replica (the Ray side lives in replicas.py)."""

    name: str
    handle: object = None     # Ray Serve's DeploymentHandle
    up: bool = False          # answered its last health probe, and its last request did not die
    in_flight: int = 0        # requests routed to it and not yet answered
    routed: int = 0           # requests routed to it, ever
    status: dict | None = None  # its last health answer (model, running, waiting)


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


class LeastLoaded:
    needs_key = False

    def choose(self, replicas: list[Replica], key: str | None = None) -> Replica | None:
        up = [r for r in replicas if r.up]
        return min(up, key=lambda r: (r.in_flight, r.routed)) if up else None


class PrefixAffinity:
    needs_key = True

    def __init__(self, names: list[str], points: int = 64, load_factor: float = 1.25):
        if load_factor < 1:
            raise ValueError(f"load_factor: must be >= 1, got {load_factor}")
        self.load_factor = load_factor
        ring = sorted((_hash(f"{name}#{i}"), index) for index, name in enumerate(names) for i in range(points))
        self.hashes = [h for h, _ in ring]   # [N * points], sorted
        self.owners = [i for _, i in ring]   # [N * points] index of the replica owning each point
        self.fallback = LeastLoaded()

    def choose(self, replicas: list[Replica], key: str | None = None) -> Replica | None:
        up = [r for r in replicas if r.up]
        if key is None or not up:
            return self.fallback.choose(replicas)
        bound = math.ceil(self.load_factor * (sum(r.in_flight for r in up) + 1) / len(up))
        start = bisect.bisect(self.hashes, _hash(key))
        seen = set()
        for step in range(len(self.hashes)):  # walk the ring from the key's place
            index = self.owners[(start + step) % len(self.hashes)]
            if index in seen:
                continue
            seen.add(index)
            if replicas[index].up and replicas[index].in_flight < bound:
                return replicas[index]
            if len(seen) == len(replicas):
                break
        return self.fallback.choose(replicas)


def prefix_key(body, kind: str, chars: int = PREFIX_CHARS) -> str | None:
    """The first `chars` characters of what the model reads first: the prompt, or the chat
    messages' roles and contents in order. None where the body has neither in a usable form."""
    if not isinstance(body, dict):
        return None
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list):
            return None
        parts, size = [], 0
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):  # text parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and
                                  isinstance(p.get("text"), str))
            if not isinstance(content, str):
                return None
            parts.append(f"{m.get('role')}\n{content}\n")
            size += len(parts[-1])
            if size >= chars:
                break
        return "".join(parts)[:chars]
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt[:chars]
    if isinstance(prompt, list):  # token ids: their decimal text stands for them
        return ",".join(map(str, prompt[:chars]))[:chars]
    return None


POLICIES = {"least-loaded": LeastLoaded, "prefix": PrefixAffinity}


def make_policy(name: str, replica_names: list[str]):
    if name == "prefix":
        return PrefixAffinity(replica_names)
    if name == "least-loaded":
        return LeastLoaded()
    raise ValueError(f"--routing: expected one of {', '.join(POLICIES)}, got {name!r}")
