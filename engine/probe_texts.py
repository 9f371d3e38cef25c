"""The quality probe's texts: code and prose the demo model and real models both handle, each long
enough (~600 tokens) that its first half fills packed KV pages when kv_compression is on."""

LRU = '''\
from collections import OrderedDict
from threading import Lock


class LRUCache:
    """A mapping that forgets the least recently used entry once it holds `capacity` of them."""

    def __init__(self, capacity=128):
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self._data = OrderedDict()
        self._lock = Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key, default=None):
        with self._lock:
            try:
                value = self._data.pop(key)
            except KeyError:
                self.misses += 1
                return default
            self._data[key] = value
            self.hits += 1
            return value

    def put(self, key, value):
        with self._lock:
            self._data.pop(key, None)
            self._data[key] = value
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)

    def __contains__(self, key):
        with self._lock:
            return key in self._data

    def __len__(self):
        return len(self._data)

    def clear(self):
        with self._lock:
            self._data.clear()
            self.hits = self.misses = 0

    def stats(self):
        total = self.hits + self.misses
        ratio = self.hits / total if total else 0.0
        return {"hits": self.hits, "misses": self.misses, "ratio": ratio, "size": len(self)}


def cached(capacity=128):
    """Decorator: remember the results of a function of hashable arguments."""
    def decorate(func):
        cache = LRUCache(capacity)

        def wrapper(*args):
            result = cache.get(args, _MISSING)
            if result is _MISSING:
                result = func(*args)
                cache.put(args, result)
            return result

        wrapper.cache = cache
        wrapper.__name__ = func.__name__
        wrapper.__doc__ = func.__doc__
        return wrapper
    return decorate


_MISSING = object()
'''

CLI = '''\
import argparse
import csv
import os
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Summarize the sizes of files under a directory.")
    parser.add_argument("root", help="directory to scan")
    parser.add_argument("--min-size", type=int, default=0, help="ignore files smaller than this")
    parser.add_argument("--ext", action="append", default=[], help="only files with this extension")
    parser.add_argument("--csv", dest="csv_path", help="also write the table to this file")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def walk(root, min_size, extensions):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if extensions and os.path.splitext(name)[1] not in extensions:
                continue
            path = os.path.join(dirpath, name)
            try:
                size = os.path.getsize(path)
            except OSError as exc:
                print(f"skipping {path}: {exc}", file=sys.stderr)
                continue
            if size >= min_size:
                yield path, size


def summarize(entries):
    by_ext = {}
    for path, size in entries:
        ext = os.path.splitext(path)[1] or "(none)"
        count, total = by_ext.get(ext, (0, 0))
        by_ext[ext] = (count + 1, total + size)
    return sorted(by_ext.items(), key=lambda item: item[1][1], reverse=True)


def main(argv=None):
    args = parse_args(argv)
    if not os.path.isdir(args.root):
        print(f"error: {args.root} is not a directory", file=sys.stderr)
        return 2
    extensions = {e if e.startswith(".") else "." + e for e in args.ext}
    rows = summarize(walk(args.root, args.min_size, extensions))
    width = max((len(ext) for ext, _ in rows), default=5)
    for ext, (count, total) in rows:
        print(f"{ext:<{width}}  {count:>6}  {total:>12,}")
    if args.csv_path:
        with open(args.csv_path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["extension", "files", "bytes"])
            for ext, (count, total) in rows:
                writer.writerow([ext, count, total])
    if args.verbose:
        print(f"{sum(c for _, (c, _) in rows)} files", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''

PROSE = '''\
A language model generates text one token at a time. For every new token it attends to the keys and
values of all the tokens before it, so an inference server keeps those keys and values in memory
instead of recomputing them: this is the KV cache. Its size grows with the number of layers, the
number of key-value heads, the head dimension and the length of every sequence being served, and on
a busy server it is the cache, not the weights, that decides how many requests can run at once.

When the cache is full, the scheduler has two choices. It can stop admitting new requests, which keeps
the running ones fast but makes the queue longer, or it can preempt a running request, free its
blocks and compute its prefix again later, which costs work that was already done. Neither is free.
A third choice is to store the cache in fewer bytes. Keys and values can be quantized to eight or four
bits with a scale and a zero point per group, and tokens that receive little attention can be dropped
altogether, keeping the first few tokens of the sequence and the most recent ones, which matter most.

Each of these trades quality for memory, and the right amount depends on the load. At night, with few
requests, there is no reason to lose any precision. At the peak, a small loss in quality can double
the number of requests served within their latency targets. An operator who must pick one setting at
start-up picks for the worst case and pays for it all day. A control loop that measures the pressure
on the cache, the latency of each request and the quality of the output can move the setting as the
load moves, and can put it back when the pressure is gone.

Measuring quality is the hard part. A probe runs a fixed set of texts through the model with the
current settings and compares the predicted distributions with those of the uncompressed model on
the same texts: how often the most likely token agrees, and how far apart the distributions are.
'''

CONFIG = '''\
from dataclasses import dataclass, field, fields


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range; the message names it."""


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 4
    timeout_s: float = 30.0
    allowed_origins: list = field(default_factory=list)
    debug: bool = False

    def validate(self):
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be in 1..65535, got {self.port}")
        if self.workers < 1:
            raise ConfigError(f"workers must be at least 1, got {self.workers}")
        if self.timeout_s <= 0:
            raise ConfigError(f"timeout_s must be positive, got {self.timeout_s}")
        for origin in self.allowed_origins:
            if not origin.startswith(("http://", "https://")):
                raise ConfigError(f"allowed_origins: {origin!r} is not an http(s) origin")


def from_dict(data, path="config"):
    """Build a ServerConfig from a parsed document, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(ServerConfig)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{path}: unknown keys {', '.join(unknown)}")
    values = {}
    for name, value in data.items():
        expected = known[name].type
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if expected in (int, float, str, bool, list) and not isinstance(value, expected):
            raise ConfigError(f"{path}.{name}: expected {expected.__name__}, got {type(value).__name__}")
        values[name] = value
    config = ServerConfig(**values)
    config.validate()
    return config


def merge(base, override):
    """A new config with the fields set in `override` (a dict) replacing those of `base`."""
    data = {f.name: getattr(base, f.name) for f in fields(ServerConfig)}
    data.update(override)
    return from_dict(data)
'''

PROBE_TEXTS = (LRU, CLI, PROSE, CONFIG)
