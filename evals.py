"""evals.py - HellaSwag, and any lm-evaluation-harness task, scored on a nanollm model.

What you will learn
  * how a language model answers a multiple-choice question it was never trained on: score
    each ending by log P(ending | context), the sum of its tokens' log-probabilities, and pick
    the likeliest;
  * why the length of an ending matters, and three answers: the plain sum (acc), the sum per
    UTF-8 byte of the ending (acc_norm, as lm-evaluation-harness does it) and the mean per
    token (acc_tokmean, build-nanogpt's "acc_norm");
  * batching rows of different lengths: right padding is harmless under a causal mask, and
    only the positions we score need the (large) vocabulary projection;
  * an adapter that lets EleutherAI's lm-evaluation-harness drive our model, so any of its
    tasks runs on a checkpoint trained here.

Worked example (one HellaSwag row, 2 endings shown):
    ctx "A man is sitting on a roof. he"   endings [" starts pulling up roofing.", " is ..."]
    ctx_ids = encode(ctx); ending_ids[i] = encode(ctx + " " + ending)[len(ctx_ids):]
    loglikelihoods[i] = sum over the ending's tokens of log softmax(logits)[token]
    pred = argmax(ll); pred_norm = argmax(ll / ending_bytes); pred_tokmean = argmax(ll / tokens)

Run it
  python evals.py --download=true                       # HellaSwag's val file (internet)
  python evals.py --init=out/cpu/ckpt_0001180.pt --hellaswag=out/evals/hellaswag_val.jsonl
  python evals.py --init=gpt2 --hellaswag=out/evals/hellaswag_val.jsonl   # GPT-2 124M from HF
  python evals.py --init=gpt2 --hellaswag=... --raw=true    # build-nanogpt's text: 29.55%
  python evals.py --init=gpt2 --tasks=lambada_openai        # any harness task (lm-eval, internet)
  python train.py --init=CKPT --eval_only=true --hellaswag=PATH   # the same, from train.py

It prints `hellaswag N examples | acc X | acc_norm Y | acc_tokmean Z` and writes one JSON line
per example to out_dir/hellaswag.jsonl (ids, log-likelihoods, lengths, predictions), so any
score can be re-checked by hand.
"""
import cli  # first: a Ctrl-C while torch loads is one line, and --help needs no torch
cli.start(__name__, __file__)

import json
import math
import os
import re
import urllib.request

import torch
import torch.nn.functional as F

import bpe
import corpora
import gpt

# hyperparameters of the demo (python evals.py --name=value)
init = ""                # the model: a checkpoint (.pt from train.py or gpt.py) or a Hugging Face GPT-2 name
hellaswag = ""           # HellaSwag jsonl (hellaswag_val.jsonl: 10,042 examples)
limit = 0                # score the first N examples; 0 = all
raw = False              # build-nanogpt's text: the `ctx` field and endings as they are
tasks = ""               # lm-evaluation-harness tasks, comma separated (needs lm-eval)
download = False         # fetch HellaSwag's validation file into out_dir (internet)
gpt2_dir = "../shared/data"  # GPT-2's vocab and merges files, for --init=gpt2...
out_dir = "out/evals"
device = "auto"          # "auto", "cpu", "cuda", "cuda:N", "mps"
threads = 0              # torch CPU threads; 0 = torch's choice

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
NO_LM_EVAL = "lm-evaluation-harness is not installed: pip install lm-eval==0.4.13"
N_ENDINGS = 4


# ----------------------------------------------------------------------------- the text
def preprocess(text):
    """lm-evaluation-harness's cleanup of HellaSwag's WikiHow rows, in its order: strip, then
    " [title]" -> ". ", then delete every [tag] (shortest match), then one pass of "  " -> " ".
    preprocess(" Make tea [title] Boil water.  [step] Pour.") -> "Make tea. Boil water. Pour."
    """
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")  # one pass: three spaces become two, as in the harness


def example_text(doc, raw=False):
    """(context, [4 endings]) as scored. The harness's query is activity_label + ": " + ctx_a
    + " " + ctx_b with its first letter upper-cased (str.capitalize: the rest lower-cased),
    all preprocessed; raw=True is build-nanogpt's: the `ctx` field and endings untouched."""
    if raw or "ctx_a" not in doc:
        ctx = doc["ctx"]
    else:
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    if raw:
        return ctx, list(doc["endings"])
    if "activity_label" in doc:
        ctx = doc["activity_label"] + ": " + ctx
    return preprocess(ctx), [preprocess(e) for e in doc["endings"]]


def encode_example(tok, ctx, endings):
    """(ctx_ids, [ending_ids]): the harness's split, encode the whole then cut after the
    context, so each ending keeps the tokens it has inside the full text (" " + ending)."""
    ctx_ids = tok.encode(ctx, allowed_special="none")
    return ctx_ids, [tok.encode(ctx + " " + e, allowed_special="none")[len(ctx_ids):]
                     for e in endings]


# ----------------------------------------------------------------------------- scoring
@torch.no_grad()
def score_one(model, ctx_ids, cont_ids):
    """The readable path: log P(cont | ctx) summed, for one row, from the full logits."""
    bs = model.config.block_size
    row = (list(ctx_ids) + list(cont_ids))[-(bs + 1):]  # the context loses its oldest tokens
    x = torch.tensor(row[:-1], device=model.wte.weight.device)[None]   # (1, T)
    logp = F.log_softmax(model(x)[0][0].float(), dim=-1)               # (T, V)
    targets = torch.tensor(row[1:], device=x.device)
    n = len(cont_ids)
    return logp[-n:].gather(1, targets[-n:, None]).sum().item() if n else 0.0


@torch.no_grad()
def score(model, rows, batch_rows=16):
    """[(sum log P(cont | ctx), greedy)] for rows [(ctx_ids, cont_ids)], batch_rows rows per
    forward; greedy: every cont token is the argmax (the harness's is_greedy).

    Each row is ctx + cont, cut from the left to block_size + 1 tokens (the model sees at most
    block_size), fed without its last token, padded on the right: a causal model never looks
    right, so padding changes nothing before it. Only the cont positions go through the LM
    head, the biggest matmul of a small model's forward."""
    bs = model.config.block_size
    dev = model.wte.weight.device
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(rows), batch_rows):
        chunk = rows[i:i + batch_rows]
        for ctx, cont in chunk:
            if not ctx:
                raise ValueError("a row to score needs at least one context token")
            if len(cont) > bs:
                raise ValueError(f"a continuation of {len(cont)} tokens does not fit the "
                                 f"model's block_size={bs}")
        seqs = [(list(ctx) + list(cont))[-(bs + 1):] for ctx, cont in chunk]
        T = max(len(s) for s in seqs) - 1
        x = torch.zeros(len(seqs), T, dtype=torch.long)                # (B, T), 0 = padding
        y = torch.zeros(len(seqs), T, dtype=torch.long)
        scored = torch.zeros(len(seqs), T, dtype=torch.bool)           # the cont positions
        for r, (s, (_, cont)) in enumerate(zip(seqs, chunk)):
            x[r, :len(s) - 1] = torch.tensor(s[:-1])
            y[r, :len(s) - 1] = torch.tensor(s[1:])
            scored[r, len(s) - 1 - len(cont):len(s) - 1] = True
        x, y, scored = x.to(dev), y.to(dev), scored.to(dev)
        h = model.hidden(x)[scored]                                    # (N, C), row by row
        logits = model.head(h).float()                                 # (N, V)
        target = y[scored]
        lp = F.log_softmax(logits, dim=-1).gather(1, target[:, None])[:, 0]
        hit = logits.argmax(-1) == target
        counts = [len(cont) for _, cont in chunk]
        for lps, hits in zip(lp.split(counts), hit.split(counts)):
            out.append((lps.double().sum().item(), bool(hits.all())))
    model.train(was_training)
    return out


def argmax(values):
    """Index of the largest value, the first one on a tie (numpy's argmax, as the harness)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def predictions(lls, ending_bytes, ending_tokens):
    """(pred, pred_norm, pred_tokmean): the best ending by sum, by sum per byte, by mean per
    token. predictions([-6, -8, -9], [10, 20, 30], [2, 4, 2]) -> (0, 2, 1)."""
    return (argmax(lls), argmax([ll / b for ll, b in zip(lls, ending_bytes)]),
            argmax([ll / t for ll, t in zip(lls, ending_tokens)]))


def score_hellaswag(model, tok, examples, rank=0, world=1, batch=8):
    """Score HellaSwag examples (read_hellaswag's) with model and tok: returns (metrics, rows).
    metrics: {"n", "acc", "acc_norm", "acc_tokmean"}; rows: one dict per example with the keys
    of hellaswag.jsonl. batch examples (4 rows each) share a forward: a GPU wants wide
    batches. Under DDP each rank scores every world-th example and the counts are summed, so
    every rank gets the same metrics (rows: only its own)."""
    if not examples:  # an accuracy of 0.0 over no examples would be a number that means nothing
        raise ValueError("no HellaSwag examples to score")
    rows, correct = [], torch.zeros(4, dtype=torch.float64)  # n, acc, acc_norm, acc_tokmean
    block_size = model.config.block_size if model is not None else None
    mine = tokenize_examples(tok, examples[rank::world], block_size)
    for i in range(0, len(mine), batch):
        chunk = mine[i:i + batch]
        flat = [(ex["ctx_ids"], e) for ex in chunk for e in ex["ending_ids"]]
        scored = score(model, flat, batch_rows=len(flat))  # one forward
        for k, ex in enumerate(chunk):
            lls = [ll for ll, _ in scored[N_ENDINGS * k:N_ENDINGS * (k + 1)]]
            nbytes = [len(e.encode("utf-8")) for e in ex["endings"]]
            ntok = [len(e) for e in ex["ending_ids"]]
            pred, pred_norm, pred_tokmean = predictions(lls, nbytes, ntok)
            rows.append(dict(ind=ex["ind"], label=ex["label"], ctx_ids=ex["ctx_ids"],
                             ending_ids=ex["ending_ids"], loglikelihoods=lls, ending_bytes=nbytes,
                             ending_tokens=ntok, pred=pred, pred_norm=pred_norm,
                             pred_tokmean=pred_tokmean))
            correct += torch.tensor([1.0, pred == ex["label"], pred_norm == ex["label"],
                                     pred_tokmean == ex["label"]], dtype=torch.float64)
    if world > 1:  # on the model's device: NCCL reduces CUDA tensors only
        import torch.distributed as dist
        correct = correct.to(model.wte.weight.device)
        dist.all_reduce(correct)
        correct = correct.cpu()
    n = int(correct[0].item())
    metrics = {"n": n, **{k: correct[j + 1].item() / max(n, 1)
                          for j, k in enumerate(("acc", "acc_norm", "acc_tokmean"))}}
    return metrics, rows


def tokenize_examples(tok, examples, block_size=None):
    """examples with their "ctx_ids" and "ending_ids" (encode_example), kept if already there.
    train.py encodes once at the start, so a text its tokenizer cannot encode (a char
    vocabulary without some letter) or an ending longer than block_size fails before
    training, not at the first evaluation."""
    out = []
    for ex in examples:
        if "ctx_ids" not in ex:
            try:
                ctx_ids, ending_ids = encode_example(tok, ex["ctx"], ex["endings"])
            except ValueError as e:
                raise ValueError(f"HellaSwag example {ex['ind']}: {e}") from None
            ex = dict(ex, ctx_ids=ctx_ids, ending_ids=ending_ids)
        longest = max(map(len, ex["ending_ids"]))
        if block_size and longest > block_size:
            raise ValueError(f"HellaSwag example {ex['ind']}: an ending of {longest} tokens does "
                             f"not fit block_size={block_size}")
        out.append(ex)
    return out


def summary_line(metrics):
    return (f"hellaswag {metrics['n']} examples | acc {metrics['acc']:.4f} | "
            f"acc_norm {metrics['acc_norm']:.4f} | acc_tokmean {metrics['acc_tokmean']:.4f}")


# ----------------------------------------------------------------------------- the harness
def harness_lm(model, tok, batch_rows=16, max_gen_toks=256):
    """An lm_eval TemplateLM over our model and tokenizer, for lm_eval.simple_evaluate(model=...).
    The harness tokenizes (TemplateLM: whole text, then cut after the context) and calls
    _loglikelihood_tokens, which is score() above; loglikelihood_rolling scores the harness's
    disjoint windows; generate_until is greedy GPT.generate (KV cache), cut at the stops."""
    try:
        from lm_eval import utils as lm_utils
        from lm_eval.api.model import TemplateLM
    except ImportError:
        raise ImportError(NO_LM_EVAL) from None
    eot = tok.special_tokens.get(corpora.EOT)

    class NanoLM(TemplateLM):
        def __init__(self):
            super().__init__()
            self.model, self.tok = model, tok
            self.max_length, self.max_gen_toks = model.config.block_size, max_gen_toks

        @property
        def eot_token_id(self):
            if eot is None:
                raise ValueError(f"the tokenizer has no {corpora.EOT} token to stand for an empty context")
            return eot

        @property
        def tokenizer_name(self):
            return f"nanollm-{tok.vocab_size}"

        def tok_encode(self, string, add_special_tokens=None, **kwargs):
            return tok.encode(string, allowed_special="none")

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
            # longest first, so a batch holds rows of about one length (little padding)
            order = sorted(range(len(requests)),
                           key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
            scored = score(model, [(requests[i][1], requests[i][2]) for i in order], batch_rows)
            out = [None] * len(requests)
            for i, s in zip(order, scored):
                out[i] = s
                self.cache_hook.add_partial("loglikelihood", requests[i][0], s)
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            out = []
            for (text,) in [r.args for r in requests]:
                windows = lm_utils.get_rolling_token_windows(  # each token predicted once
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)
                windows = [lm_utils.make_disjoint_window(w) for w in windows]
                out.append(sum(ll for ll, _ in score(model, windows, batch_rows)))
                self.cache_hook.add_partial("loglikelihood_rolling", (text,), out[-1])
            return out

        def generate_until(self, requests, disable_tqdm=False):
            return [self._generate(*r.args) for r in requests]

        def _generate(self, context, gen_kwargs):
            kw = dict(gen_kwargs)
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n_new = int(kw.get("max_gen_toks", self.max_gen_toks))
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0
            ids = self.tok_encode(context)[-max(1, self.max_length - n_new):] or [self.eot_token_id]
            out = model.generate(ids, n_new, temperature=temperature, eot_id=eot, seed=0)
            new = [t for t in out[0, len(ids):].tolist() if t != eot]
            text = tok.decode(new)
            for stop in until:  # the text up to the first stop string
                if stop:
                    text = text.split(stop)[0]
            return text

    return NanoLM()


def harness_evaluate(lm, task_names, limit=None, include_path=None, log_samples=False):
    """lm_eval.simple_evaluate on our adapter: {"results": {task: {metric: value}}, ...}."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ImportError(NO_LM_EVAL) from None
    manager = (TaskManager(include_path=include_path, include_defaults=False)  # no index of
               if include_path else None)  # the ~14,000 built-in task files: seconds saved
    return lm_eval.simple_evaluate(model=lm, tasks=list(task_names), limit=limit,
                                   task_manager=manager, log_samples=log_samples,
                                   bootstrap_iters=0)


def harness_hellaswag_yaml(jsonl_path, folder, task="hellaswag_local"):
    """A harness task over a local HellaSwag jsonl (no hub access): the harness's own hellaswag
    task (its YAML, preprocessing and metrics, acc_bytes added) with the dataset swapped for
    the file. Returns the YAML's path; pass its folder as include_path."""
    try:
        import lm_eval.tasks
    except ImportError:
        raise ImportError(NO_LM_EVAL) from None
    yaml_src = os.path.join(os.path.dirname(lm_eval.tasks.__file__), "hellaswag", "hellaswag.yaml")
    path = os.path.join(folder, f"{task}.yaml")
    text = "\n".join([
        f"include: {json.dumps(yaml_src)}", f"task: {task}", "tag: []", "dataset_path: json",
        "dataset_name: null", "dataset_kwargs:", "  data_files:",
        f"    validation: {json.dumps(os.path.abspath(jsonl_path))}",
        f"  cache_dir: {json.dumps(os.path.abspath(os.path.join(folder, 'hf_cache')))}",
        "training_split: null", "validation_split: validation", "metric_list:",
        *[f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true"
          for m in ("acc", "acc_norm", "acc_bytes")], ""])
    with cli.atomic_open(path) as f:
        f.write(text.encode("utf-8"))
    return path


# ----------------------------------------------------------------------------- files
def read_hellaswag(path, raw=False, limit=0):
    """HellaSwag examples from a jsonl file: [{"ind", "label", "ctx", "endings"}], the text
    as scored (example_text). Every line is checked; a bad one is a ValueError naming
    path:line. limit: the first N examples (0 = all)."""
    if not path:
        raise ValueError("--hellaswag needs a file: --hellaswag=PATH/hellaswag_val.jsonl "
                         "(python evals.py --download=true fetches it)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no HellaSwag file at {path}")
    examples = []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            examples.append(parse_example(line, f"{path}:{n}", len(examples), raw))
            if limit and len(examples) == limit:
                break
    if not examples:
        raise ValueError(f"{path}: no examples (the file is empty)")
    return examples


def parse_example(line, where, position, raw=False):
    doc = cli.parse_json(line, where)  # bad JSON, not UTF-8, nested too deep: one line naming where
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    endings = doc.get("endings")
    if not isinstance(endings, list) or len(endings) != N_ENDINGS \
            or not all(isinstance(e, str) for e in endings):
        got = f"{len(endings)} items" if isinstance(endings, list) else repr(endings)[:40]
        raise ValueError(f"{where}: 'endings' must be a list of {N_ENDINGS} strings, got {got}")
    label = doc.get("label")
    if isinstance(label, str) and label.strip().isascii() and label.strip().isdigit():  # not "²"
        label = int(label)  # the Hugging Face copy writes labels as "0".."3"
    if type(label) is not int or not 0 <= label < N_ENDINGS:
        raise ValueError(f"{where}: 'label' must be 0, 1, 2 or 3, got {doc.get('label')!r}")
    need = ["ctx"] if raw or "ctx_a" not in doc else ["ctx_a", "ctx_b"]
    for key in need + [k for k in ("activity_label",) if k in doc]:
        if not isinstance(doc.get(key), str):
            raise ValueError(f"{where}: '{key}' must be a string, got {doc.get(key)!r}"[:200])
    ctx, ends = example_text(doc, raw)
    if not ctx.strip():
        raise ValueError(f"{where}: the context is empty")
    if not all(e.strip() for e in ends):
        raise ValueError(f"{where}: an ending is empty: {ends}")
    ind = doc.get("ind", position)
    return {"ind": ind if type(ind) is int else position, "label": label, "ctx": ctx,
            "endings": ends}


def write_rows(path, rows):
    """One JSON object a line, written atomically (a crash never leaves half a file)."""
    with cli.atomic_open(path) as f:
        for r in rows:
            f.write((json.dumps(r) + "\n").encode("utf-8"))


def download_hellaswag(folder, split="val"):
    """Fetch HellaSwag's jsonl (split val, train or test; test has no labels) from the
    authors' GitHub repository into folder, once. Needs internet; never run in the tests."""
    split = cli.one_of("HellaSwag split", split, ["val", "train", "test"])
    path = os.path.join(folder, f"hellaswag_{split}.jsonl")
    if not os.path.exists(path):
        url = HELLASWAG_URL.format(split=split)
        print(f"downloading {url}")
        with urllib.request.urlopen(url, timeout=60) as r, cli.atomic_open(path) as f:
            f.write(r.read())
    return path


def load_model(name, gpt2_dir="../shared/data", device="cpu"):
    """(model, tokenizer) from a nanollm checkpoint file (gpt.load_model) or a Hugging Face
    GPT-2 name ("gpt2", "gpt2-medium", ...: GPT.from_pretrained, internet, with GPT-2's files
    from gpt2_dir)."""
    if not name:
        raise ValueError("no model: pass a checkpoint file or a Hugging Face GPT-2 name")
    if os.path.isfile(name):
        model, tok, _ = gpt.load_model(name, device=device)
        return model, tok
    if not re.fullmatch(r"(openai-community/)?(distil)?gpt2(-medium|-large|-xl)?", name):
        raise FileNotFoundError(f"no checkpoint at {name} (nor a Hugging Face GPT-2 name)")
    files = [os.path.join(gpt2_dir, f) for f in ("gpt2_vocab.json", "gpt2_merges.txt")]
    if not all(os.path.isfile(f) for f in files):
        raise FileNotFoundError(f"--init={name} needs GPT-2's gpt2_vocab.json and "
                                f"gpt2_merges.txt in --gpt2_dir={gpt2_dir}")
    m = gpt.GPT.from_pretrained(name)
    return m.to(device).eval(), bpe.Tokenizer.from_gpt2_files(*files)


def run_hellaswag(model, tok, examples, out_dir):
    """Score examples (already read and checked, so a bad file leaves nothing behind), write
    out_dir/hellaswag.jsonl, print the summary line; returns the metrics."""
    metrics, rows = score_hellaswag(model, tok, examples)
    with cli.hold_dir(out_dir):
        write_rows(os.path.join(out_dir, "hellaswag.jsonl"), rows)
    print(summary_line(metrics))
    return metrics


# ----------------------------------------------------------------------------- demo
def main():
    cli.check(globals(), [("limit", limit >= 0, ">= 0 (0 = all)"),
                          ("threads", 0 <= threads <= cli.MAX_THREADS, f"in [0, {cli.MAX_THREADS}] (0: torch's choice)")])
    if threads:
        torch.set_num_threads(threads)
    path = hellaswag
    if download:
        saved = download_hellaswag(out_dir)
        print(f"saved {saved}")
        if not init:
            return
        path = path or saved
    if not path and not tasks:
        raise ValueError("nothing to do: pass --hellaswag=PATH and/or --tasks=NAMES "
                         "(or --download=true)")
    examples = read_hellaswag(path, raw, limit) if path else None  # checked first
    net, tok = load_model(init, gpt2_dir, gpt.pick_device(device))
    if examples is not None:
        run_hellaswag(net, tok, examples, out_dir)
    if tasks:
        res = harness_evaluate(harness_lm(net, tok), tasks.split(","), limit=limit or None)
        for task, values in res["results"].items():
            print(task + " | " + " | ".join(f"{k} {v:.4f}" for k, v in values.items()
                                             if isinstance(v, float) and math.isfinite(v)))


if __name__ == "__main__":
    cli.run(main, globals())
