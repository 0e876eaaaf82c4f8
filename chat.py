"""chat.py - talk to what you trained: type a prompt, watch the model answer token by token.

What you will learn
  * streaming generation: the same loop as GPT.generate (the prompt through the KV cache once,
    then one token per step, gpt.sample picking each), written as a Python generator so every
    token can be printed the moment it is sampled;
  * printing tokens that are pieces of characters: a byte-level BPE token may hold half of a
    UTF-8 character, so an incremental decoder holds the bytes back until the character is whole;
  * a chat session: finetune.py's format around each turn, the conversation kept as history and
    trimmed from the oldest turn when it no longer fits the context;
  * a base model (no chat tokens in its tokenizer) has no turns: it continues each line you type.

Run it
  python chat.py                         # the newest checkpoint under out/ (gpt.py's, train.py's
                                         # or finetune.py's), named in the first line
  python chat.py --init=out/finetune/ckpt.pt --temperature=0
  printf 'add two and three\n/temp 0\nreverse: sun moon\n' | python chat.py 2>/dev/null
  python chat.py --help                  # every constant below is an --name=value option

Commands (a line starting with "/")
  /reset  a new conversation       /temp 0.8   temperature (0 = greedy)
  /topk 50  (0 = off)              /topp 0.9   nucleus (1 = off)
  /seed N   restart the sampler    /quit       (or Ctrl-D)
Ctrl-C during an answer stops that answer; at the prompt it ends the program.
The answers go to stdout, everything else (the banner, a line of tokens and tokens/s after
each answer, errors) to stderr, so a script can pipe prompts in and read answers out. Piped
prompts are echoed to stdout after the prompt sign ("> " or "you> "), as a terminal shows
them, so that one answer does not run into the next.
"""
import cli  # first: a Ctrl-C while torch loads is one line, and --help needs no torch
cli.start(__name__, __file__)

import codecs
import glob
import os
import sys
import time

import torch

import corpora
import dataloader
import finetune
import gpt

# ----------------------------------------------------------------------------- options
init = ""                # a checkpoint .pt; "" = the newest under out_dir
out_dir = "out"          # where gpt.py, train.py and finetune.py save
tokenizer = ""           # "" = the tokenizer the checkpoint names
max_new_tokens = 256     # per answer
temperature = 0.8        # 0 = greedy
top_k = 0                # 0 = off
top_p = 0.95             # 1 = off
seed = 1337              # the sampler's seed at the start (and after /seed N)
device = "auto"          # "auto", "cpu", "cuda", "cuda:N", "mps"
threads = 0              # torch CPU threads; 0 = torch's choice

COMMANDS = ("/reset", "/temp", "/topk", "/topp", "/seed", "/quit", "/help")
HELP = """  /reset      a new conversation (forget the history)
  /temp 0.8   temperature (0 = greedy)
  /topk 50    keep the 50 likeliest tokens (0 = off)
  /topp 0.9   keep the smallest set reaching probability 0.9 (1 = off)
  /seed N     restart the sampler: the next answer is GPT.generate(..., seed=N)'s
  /quit       end (so does Ctrl-D); Ctrl-C stops an answer
"""


# ----------------------------------------------------------------------------- streaming
@torch.no_grad()
def stream(model, ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop=(),
           generator=None):
    """Yield up to max_new_tokens sampled token ids one at a time; the last is a stop id if
    one was sampled. The same steps as GPT.generate, so with the same generator state the
    same tokens: the prompt fills the KV cache once, then each step feeds one new token;
    past the context the window is recomputed (every position shifts)."""
    gpt.check_sampling(temperature, top_k, top_p)
    dev = model.wte.weight.device
    idx = torch.tensor([ids], dtype=torch.long, device=dev)              # (1, T)
    bs = model.config.block_size
    model.eval()
    cache = None
    for _ in range(max_new_tokens):
        if idx.size(1) <= bs:
            if cache is None:
                cache = model.new_cache(1, min(bs, idx.size(1) + max_new_tokens))
                x = model.hidden(idx, cache)                             # the prompt, once
            else:
                x = model.hidden(idx[:, -1:], cache)                     # one new token
        else:
            x = model.hidden(idx[:, -bs:])
        nxt = gpt.sample(model.head(x[:, -1]), temperature, top_k, top_p, generator)  # (1,)
        idx = torch.cat([idx, nxt[:, None]], dim=1)
        yield nxt.item()
        if nxt.item() in stop:
            return


class TextStream:
    """Token ids in, printable text out, one token at a time. Bytes that end in the middle of
    a UTF-8 character are held back until it is complete, so the text printed piece by piece
    equals tok.decode of all the ids at once (invalid bytes become U+FFFD in both).

    >>> s = TextStream(tok)   # a byte-level BPE whose ids 195, 169 are the bytes of "é"
    >>> s.push(195), s.push(169), s.flush()
    ('', 'é', '')
    """

    def __init__(self, tok):
        self.tok = tok
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token):
        return self.decoder.decode(self.tok.decode_bytes([token]))

    def flush(self):
        return self.decoder.decode(b"", final=True)


# ----------------------------------------------------------------------------- the session
def is_chat_model(tok):
    """Finetuned (finetune.py added its chat tokens to the tokenizer) or a base model."""
    return all(s in tok.special_tokens for s in finetune.CHAT_TOKENS)


class Session:
    """One conversation with a model: the sampling settings, the sampler's random generator,
    and (for a chat model) the history, a list of finetune.py messages."""

    def __init__(self, model, tok, max_new_tokens=256, temperature=0.8, top_k=None, top_p=None,
                 seed=1337):
        gpt.check_sampling(temperature, top_k, top_p)
        self.model, self.tok = model, tok
        self.max_new_tokens = max_new_tokens
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.chat = is_chat_model(tok)
        sp = tok.special_tokens
        ends = ("<|end|>", corpora.EOT) if self.chat else (corpora.EOT,)
        self.stop = {sp[s] for s in ends if s in sp}
        self.history = []
        self.set_seed(seed)

    def set_seed(self, n):
        """The sampler starts over: the next answer equals GPT.generate(..., seed=n)."""
        self.seed = n
        self.generator = torch.Generator(device=self.model.wte.weight.device).manual_seed(n)

    def prompt(self, text):
        """Token ids for the model to continue. A base model: [<|endoftext|>] + the text. A chat
        model: finetune.prompt_ids of the history plus this user turn, the oldest turns (a user
        message and its reply) dropped until the answer has room: min(max_new_tokens,
        block_size // 2) positions. A turn that alone is longer than the context is refused
        (the history is left as it was)."""
        bs, tok, sp = self.model.config.block_size, self.tok, self.tok.special_tokens
        if not self.chat:
            ids = ([sp[corpora.EOT]] if corpora.EOT in sp else []) + tok.encode_ordinary(text)
        else:
            user = [{"role": "user", "content": text}]
            ids = finetune.prompt_ids(tok, user)
        if len(ids) > bs:
            raise ValueError(f"the prompt is {len(ids)} tokens, more than the model's context of "
                             f"{bs}: shorten it")
        if self.chat:
            room = min(self.max_new_tokens, bs // 2)
            while True:
                ids = finetune.prompt_ids(tok, self.history + user)
                if len(ids) + room <= bs or not self.history:
                    break
                del self.history[:2]                   # the oldest user turn and its reply
        return ids

    def reply(self, text, out, err):
        """Stream the answer to text onto out, one flush per token; then a line of stats on err.
        Ctrl-C stops the answer (what was printed stays, in the history too)."""
        ids = self.prompt(text)
        printer, new, stopped = TextStream(self.tok), [], False
        t0 = time.perf_counter()
        tokens = stream(self.model, ids, self.max_new_tokens, self.temperature, self.top_k,
                        self.top_p, self.stop, self.generator)
        try:
            for t in tokens:
                new.append(t)
                if t in self.stop:
                    break
                out.write(printer.push(t))
                out.flush()
        except KeyboardInterrupt:
            stopped = True
        finally:
            tokens.close()
        dt = time.perf_counter() - t0
        out.write(printer.flush() + "\n")
        out.flush()
        if self.chat:  # the reply as text (special tokens in it dropped), as finetune.py trains
            special = set(self.tok.special_tokens.values())
            content = self.tok.decode([t for t in new if t not in special])
            self.history += [{"role": "user", "content": text},
                             {"role": "assistant", "content": content}]
        why = ("stopped" if stopped else "" if new and new[-1] in self.stop
               else "max_new_tokens" if len(new) == self.max_new_tokens else "")
        err.write(f"[{len(new)} tokens, {len(new) / max(dt, 1e-9):.1f} tokens/s"
                  + (f", {why}" if why else "") + "]\n")
        err.flush()
        return new

    def command(self, line, err):
        """Apply one /command; returns False for /quit. A bad one is a ValueError."""
        name, _, arg = line.partition(" ")
        name, arg = cli.one_of("command", name, COMMANDS), arg.strip()
        if name == "/quit":
            return False
        if name == "/reset":
            self.history = []
            err.write("(a new conversation)\n")
        elif name == "/help":
            err.write(HELP)
        else:
            kind, setting = {"/temp": (float, "temperature"), "/topk": (int, "top_k"),
                             "/topp": (float, "top_p"), "/seed": (int, "seed")}[name]
            value = parse_number(name, arg, kind)
            if name == "/seed":
                if not 0 <= value < 2**63:  # torch's generator takes a 64-bit seed
                    raise ValueError(f"/seed {arg}: must be in [0, 2**63)")
                self.set_seed(value)
            else:
                new = dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
                if name == "/topk" and value < 0:
                    raise ValueError(f"{name} {arg}: top_k must be >= 0 (0 = off)")
                new[setting] = (value or None) if name == "/topk" else value  # /topk 0 = off
                try:
                    gpt.check_sampling(**new)
                except ValueError as e:
                    raise ValueError(f"{name} {arg}: {e}") from None
                self.temperature, self.top_k, self.top_p = new.values()
            err.write(f"({setting} = {value})\n")
        err.flush()
        return True

    def run(self, lines, out, err):
        """Read prompts and commands from lines (a file: stdin) until /quit or end of input.
        A bad line is one error line on err; the session goes on."""
        while True:
            try:
                line = read_line(lines, "you> " if self.chat else "> ")
            except EOFError:   # Ctrl-D, or the end of piped input
                if lines is sys.stdin and lines.isatty():
                    print()
                return
            text = line.rstrip("\r\n")
            if lines is sys.stdin and not lines.isatty() and text.strip():  # piped: echo it
                out.write(f"{'you> ' if self.chat else '> '}{text}\n")
            try:
                if text.strip().startswith("/"):
                    if not self.command(text.strip(), err):
                        return
                elif text.strip():
                    self.reply(text, out, err)
            except ValueError as e:
                out.flush()
                err.write(f"error: {e}\n")
                err.flush()


# ----------------------------------------------------------------------------- plumbing
def read_line(lines, prompt):
    """One line of input: with the line editor and a prompt at a terminal; EOFError at the end."""
    if lines is sys.stdin and lines.isatty():
        return input(prompt)
    line = lines.readline()
    if not line:
        raise EOFError
    return line


def parse_number(name, text, kind):
    if not text:
        example = {"/temp": "0.8", "/topk": "50", "/topp": "0.9"}.get(name, "1337")
        raise ValueError(f"{name} needs a value, e.g. {name} {example}")
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"{name} expects {'an integer' if kind is int else 'a number'}, "
                         f"got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} expects a finite number, got {text!r}")
    return value


def newest_checkpoint(folder):
    """The newest checkpoint under folder that gpt.py, train.py or finetune.py wrote, or None.
    finetune.newest_checkpoint finds gpt.py's and train.py's; finetune.py's is folder/*/ckpt.pt."""
    found = [p for p in [finetune.newest_checkpoint(folder)] if p]
    found += glob.glob(os.path.join(folder, "*", "ckpt.pt"))
    return max(found, key=os.path.getmtime, default=None)


def load(path, tok_path=""):
    """(model, tokenizer) from any nanollm checkpoint: the one place chat.py reads one."""
    model, tok, _ = gpt.load_model(path, tok_path)
    return model, tok


def main():
    cli.check(globals(), [("max_new_tokens", max_new_tokens >= 1, "at least 1"),
                          ("top_k", top_k >= 0, ">= 0 (0 = off)"),
                          ("threads", 0 <= threads <= cli.MAX_THREADS, f"in [0, {cli.MAX_THREADS}] (0: torch's choice)")])
    gpt.check_sampling(temperature, top_k or None, top_p)
    dev = gpt.pick_device(device)
    if threads:
        torch.set_num_threads(threads)
    path = init or newest_checkpoint(out_dir)
    if path is None:
        raise ValueError(f"no checkpoint under {out_dir}/: make one with `python gpt.py` (a base "
                         "model, minutes on a CPU), then `python finetune.py` (a chat model); "
                         "or pass --init=CKPT")
    model, tok = load(path, tokenizer)
    session = Session(model.to(dev), tok, max_new_tokens, temperature, top_k or None, top_p, seed)
    kind = ("chat model: finetune.py's format, history kept" if session.chat
            else "base model: continues each line")
    print(f"chat.py: {path} | {model.num_params():,} parameters, context "
          f"{model.config.block_size} tokens | {kind}", file=sys.stderr)
    print("commands: /reset /temp /topk /topp /seed /quit /help; Ctrl-C stops an answer, "
          "Ctrl-D exits", file=sys.stderr)
    session.run(sys.stdin, sys.stdout, sys.stderr)


if __name__ == "__main__":
    cli.run(main, globals())
