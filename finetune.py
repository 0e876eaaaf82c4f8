"""finetune.py - from a model that continues text to one that answers: SFT with LoRA, then DPO.

What you will learn
  * a chat format: three special tokens (<|user|>, <|assistant|>, <|end|>) appended to a
    trained vocabulary without retraining it, and the model's embedding/head grown to match
    (with LoRA the new rows train: the embedding's, and an untied head's);
  * supervised finetuning (SFT): the loss only on the assistant's tokens (a mask), padded
    batches, train.py's AdamW and learning-rate schedule reused;
  * LoRA: a frozen weight W plus a trainable low-rank update (alpha / r) * B @ A, with B
    starting at zero so the model is unchanged at step 0, merged back into W at the end;
    full finetuning is one flag away (--method=full);
  * measuring it: exact-match accuracy on held-out synthetic tasks before and after, and the
    pretraining val loss before and after: how much the model forgot (replay, mixing some
    pretraining text into SFT, keeps that small);
  * DPO: preference tuning on (right answer, the model's own wrong answer) pairs against a
    frozen reference, scored by how often the model prefers the right one on held-out pairs;
    with dropout off in both (the policy must start as the reference: loss log 2 at step 0).

Run it
  python finetune.py                        # newest checkpoint under out/ (or a fresh tiny one)
  python finetune.py --method=full          # full finetuning instead of LoRA
  python finetune.py --data=chats.jsonl     # your conversations, one JSON object a line:
      {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
       "rejected": "go away"}              # "rejected" (optional): a worse last reply, for DPO
  python finetune.py --help                 # every constant below is an --name=value option

It writes out_dir/finetune/ckpt.pt (gpt.py's checkpoint format) and tokenizer.json beside it.
"""
import cli  # first: a Ctrl-C while torch loads is one line, and --help needs no torch
cli.start(__name__, __file__)

import copy
import filecmp
import glob
import json
import math
import os
import random
import time
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import bpe
import corpora
import dataloader
import gpt
import optim
import train

# ----------------------------------------------------------------------------- hyperparameters
out_dir = "out"          # where gpt.py / train.py saved; results go to out_dir/finetune
init = ""                # a checkpoint .pt; "" = the newest under out_dir (none: train a tiny one)
tokenizer = ""           # "" = the tokenizer the checkpoint names
pretrain_iters = 400     # steps of train.py for a fresh tiny model, when there is no checkpoint
data = ""                # JSONL conversations; "" = the built-in synthetic tasks
tasks = "add,reverse,count,quote"
n_train = 1000           # synthetic training examples per task
n_eval = 50              # held-out examples per task (user data: eval_frac of the lines)
eval_frac = 0.1
method = "lora"          # "lora" or "full"
lora_rank = 8
lora_alpha = 16.0        # the update is scaled by alpha / rank
lora_dropout = 0.0
lora_targets = "c_attn,c_proj,c_fc,c_gate"  # Linear layers inside the blocks, by name
batch_size = 32
sft_iters = 1000
sft_lr = 3e-3            # LoRA wants a larger rate than full finetuning (try 3e-4 there)
dpo_prompts = 800        # training questions the SFT model answers, to find its mistakes
dpo_iters = 150
dpo_lr = 3e-4
dpo_beta = 0.1           # how far DPO may move from the reference (larger = less far)
dpo_sft = 1.0            # weight of the right answers' NLL added to the DPO loss (0 = pure DPO)
replay = 0.5             # weight of a pretraining-text loss mixed into SFT (0 = off)
weight_decay = 0.0
warmup_iters = 20
num_samples = 4          # sample conversations printed at the end
seed = 1337
threads = 0              # torch CPU threads; 0 = torch's choice

CHAT_TOKENS = ("<|user|>", "<|assistant|>", "<|end|>")
METHODS = ("lora", "full")
TASKS = ("add", "reverse", "count", "quote")
ROLES = ("user", "assistant")


# ----------------------------------------------------------------------------- chat format
def add_chat_tokens(tok):
    """A copy of tok with the chat tokens as new special tokens after its last id. The
    merges (or characters) are untouched, so every text encodes exactly as before."""
    special, next_id = dict(tok.special_tokens), tok.vocab_size
    for s in CHAT_TOKENS:
        if s not in special:
            special[s], next_id = next_id, next_id + 1
    if isinstance(tok, dataloader.CharTokenizer):
        return dataloader.CharTokenizer(tok.chars, special)
    return bpe.Tokenizer(tok.merges, special, tok.pattern, tok.byte_ids)


def grow_vocab(model, vocab_size):
    """A copy of model whose embedding (and head) has rows for ids up to vocab_size.

    A new row starts as the mean of the trained rows: an "average token" that the model
    already handles calmly (random rows could be far out of distribution), plus a little
    noise so that the new tokens differ from each other.
    """
    c = model.config
    old = c.vocab_size
    if vocab_size == old:
        return model
    bigger = gpt.GPT(replace(c, vocab_size=vocab_size)).to(model.wte.weight.device)
    sd = model.state_dict()
    g = torch.Generator().manual_seed(0)
    for key in ("wte.weight",) if c.tie_embeddings else ("wte.weight", "lm_head.weight"):
        w = sd[key][:old]                                             # (V, C) trained rows
        noise = torch.randn(vocab_size - old, w.size(1), generator=g)
        pad = w.new_zeros(bigger.config.padded_vocab - vocab_size, w.size(1))
        sd[key] = torch.cat([w, w.mean(0) + 0.1 * w.std(0) * noise, pad])
    if c.tie_embeddings:
        sd["lm_head.weight"] = sd["wte.weight"]
    bigger.load_weights(sd)
    return bigger


def encode_chat(tok, messages):
    """Messages -> (ids, mask): mask[i] = 1 where token i is one the assistant must produce.

    Layout: [<|endoftext|>] <|user|> text <|end|> <|assistant|> text <|end|> ...
    The model is prompted with <|assistant|>, so it learns to write the reply and <|end|>.
    """
    sp = tok.special_tokens
    ids, mask = ([sp[corpora.EOT]], [0]) if corpora.EOT in sp else ([], [])
    for m in messages:
        body = tok.encode_ordinary(m["content"]) + [sp["<|end|>"]]
        ids += [sp[f"<|{m['role']}|>"]] + body
        mask += [0] + [int(m["role"] == "assistant")] * len(body)
    return ids, mask


def prompt_ids(tok, messages):
    """Token ids that ask for the assistant's next turn: the conversation, then <|assistant|>."""
    return encode_chat(tok, messages)[0] + [tok.special_tokens["<|assistant|>"]]


def collate(examples):
    """(ids, mask) pairs -> x, y (B, T) padded to the longest; y = -1 where no loss is taken.
    Right padding is safe: attention is causal, so real tokens never look at the padding."""
    T = max(len(ids) for ids, _ in examples) - 1
    x = torch.zeros(len(examples), T, dtype=torch.long)
    y = torch.full((len(examples), T), -1, dtype=torch.long)
    for i, (ids, mask) in enumerate(examples):
        ids, keep = torch.tensor(ids), torch.tensor(mask[1:], dtype=torch.bool)
        x[i, :len(ids) - 1] = ids[:-1]
        y[i, :len(ids) - 1] = torch.where(keep, ids[1:], -1)  # target t is token t+1
    return x, y


# ----------------------------------------------------------------------------- data
WORDS = ("king queen lord lady love heart night day sun moon star sword crown blood death grave "
         "heaven earth fair sweet good noble true false brave gentle honest eye hand tongue soul "
         "father mother son daughter brother friend enemy war peace rose fool knave ghost witch "
         "storm sea fire light dark gold").split()
NUMBERS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
           "fifteen sixteen seventeen eighteen nineteen twenty").split()


def quote_lines():
    """Verse lines of the built-in plays with at least five words (not speaker tags)."""
    return [line for play in corpora.load_plays() for line in play.splitlines()
            if len(line.split()) >= 5 and not line.endswith(":")]


def make_task(name, rng, lines):
    """One (question, answer) for task `name`. Numbers are words, so any tokenizer trained
    on the plays can spell every question."""
    if name == "add":
        a, b = rng.randint(0, 10), rng.randint(0, 10)
        return f"add {NUMBERS[a]} and {NUMBERS[b]}", NUMBERS[a + b]
    if name == "reverse":
        words = rng.sample(WORDS, 3)
        return "reverse: " + " ".join(words), " ".join(words[::-1])
    if name == "count":
        word = rng.choice([w for w in WORDS if len(w) >= 4])
        letter = rng.choice(word if rng.random() < 0.8 else "abcdefghijklmnopqrstuvwxyz")
        return f"how many {letter} in {word}", NUMBERS[word.count(letter)]
    if name == "quote":  # the last word of a verse line: what did pretraining teach?
        words = rng.choice(lines).split()
        return "finish: " + " ".join(words[-6:-1]), words[-1].strip(".,;:!?'\"-—")
    raise ValueError(f"unknown task {name!r}; valid tasks: add, reverse, count, quote")


def synthetic_tasks(names, n_train, n_eval, seed):
    """Deterministic train and held-out sets of (messages, None, task), questions unique.

    The held-out questions never appear in training, so accuracy on them measures a skill
    learned, not an answer remembered. (None: no rejected answer; DPO makes its own.)
    """
    if not names:
        raise ValueError("no task named; valid tasks: add, reverse, count, quote")
    rng = random.Random(seed)
    lines = quote_lines() if "quote" in names else []
    train_set, held_out = [], []
    for name in names:
        seen, items = set(), []
        for _ in range(50 * (n_train + n_eval)):  # small task spaces stop early
            q, a = make_task(name, rng, lines)
            if q not in seen and a:
                seen.add(q)
                items.append(([{"role": "user", "content": q},
                               {"role": "assistant", "content": a}], None, name))
            if len(items) == n_train + n_eval:
                break
        held_out += items[:n_eval]
        train_set += items[n_eval:]
    return train_set, held_out


def read_conversations(path):
    """JSONL lines {"messages": [...], "rejected": optional str} -> (messages, rejected, "data").

    Every problem names the file and line: a half-read dataset is worse than none.
    """
    out = []
    for n, row in cli.read_jsonl(path):  # lines end at \n only: a message may hold U+2028
        where = f"{path}:{n}"
        msgs = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f'{where}: expected an object with a "messages" list')
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ROLES \
                    or not isinstance(m.get("content"), str):
                raise ValueError(f'{where}: each message needs "role" (user or assistant) '
                                 f'and a "content" string, got {json.dumps(m)[:80]}')
        if msgs[-1]["role"] != "assistant":
            what = "has no assistant turn" if all(m["role"] != "assistant" for m in msgs) \
                else "does not end with an assistant turn"
            raise ValueError(f"{where}: conversation {what}")
        rejected = row.get("rejected")
        if rejected is not None and not isinstance(rejected, str):
            raise ValueError(f'{where}: "rejected" must be a string')
        out.append((msgs, rejected, "data"))
    if not out:
        raise ValueError(f"{path}: no conversations")
    return out


# ----------------------------------------------------------------------------- LoRA
class LoRALinear(nn.Module):
    """y = W x + b + (alpha / r) * B A dropout(x): W, b frozen; A (r, in) and B (out, r) train.

    Training r * (in + out) numbers instead of in * out: the bet is that finetuning changes
    a weight matrix in only a few directions. B starts at zero, so at step 0 the layer is
    exactly the pretrained one; A starts random so that B's first gradients are not zero.
    """

    def __init__(self, base, rank, alpha, dropout=0.0):
        super().__init__()
        self.base = base
        like = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.A = nn.Parameter(torch.randn(rank, base.in_features, **like)
                              / math.sqrt(base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, **like))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)

    @property
    def weight(self):  # for code that asks a layer for its device and dtype (the KV cache)
        return self.base.weight

    def forward(self, x):                                      # x (B, T, in)
        return self.base(x) + self.scale * (self.dropout(x) @ self.A.t() @ self.B.t())

    def merged(self):
        """A plain Linear with W + (alpha / r) * B @ A: the same function, no extra cost."""
        lin = nn.Linear(self.base.in_features, self.base.out_features,
                        bias=self.base.bias is not None).to(self.A)
        with torch.no_grad():
            lin.weight.copy_(self.base.weight + self.scale * self.B @ self.A)
            if self.base.bias is not None:
                lin.bias.copy_(self.base.bias)
        return lin


def add_lora(model, targets, rank, alpha, dropout=0.0):
    """Freeze model and wrap the blocks' Linear layers named in targets; returns the adapters.
    targets: names like "c_attn", "c_proj" (attention and MLP both), or "mlp.c_fc"."""
    model.requires_grad_(False)
    wrapped = []
    for name, module in model.h.named_modules():
        for child, layer in list(module.named_children()):
            path = f"{name}.{child}"
            if isinstance(layer, nn.Linear) and any(path.endswith("." + t) for t in targets):
                setattr(module, child, LoRALinear(layer, rank, alpha, dropout))
                wrapped.append(getattr(module, child))
    if not wrapped:
        raise ValueError(f"lora_targets {','.join(targets)} match no Linear layer in the blocks")
    return wrapped


def merge_lora(model):
    """Replace every LoRALinear by its merged Linear, in place."""
    for module in list(model.modules()):
        for child, layer in list(module.named_children()):
            if isinstance(layer, LoRALinear):
                setattr(module, child, layer.merged())
    return model


def train_new_rows(model, first_new):
    """Let the rows of the new chat tokens train while the old rows stay frozen: in the
    embedding and, when the head is a matrix of its own (tie_embeddings=False), in the head
    too, or the model could read <|end|> but never learn to predict it.

    The new tokens have no pretrained meaning to keep; the gradient of every older row is
    zeroed (and with no weight decay on either, optimize's groups, Adam leaves those rows
    exactly as they were). Returns the hooks' handles: .remove() each when training is done.
    """
    handles = []
    untied = [] if model.config.tie_embeddings else [model.lm_head.weight]
    for w in [model.wte.weight] + untied:
        w.requires_grad_(True)
        keep = torch.zeros(w.size(0), 1, device=w.device)
        keep[first_new:model.config.vocab_size] = 1
        handles.append(w.register_hook(lambda g, keep=keep: g * keep))
    return handles


# ----------------------------------------------------------------------------- losses
def sequence_logp(model, x, y):
    """Sum of log p(y_t | x_<=t) over the positions where y != -1: (B,) for (B, T) x, y."""
    logits, _ = model(x)
    logp = F.log_softmax(logits, dim=-1)
    token = logp.gather(-1, y.clamp(min=0)[..., None])[..., 0]   # (B, T)
    return (token * (y != -1)).sum(-1)


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta):
    """DPO (Rafailov et al., 2023): -log sigmoid(beta * (how much more the policy than the
    reference prefers chosen over rejected)). No reward model: the log-ratio is the reward."""
    margin = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin).mean()


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def answer(model, tok, messages, max_new_tokens=24):
    """Greedy reply to the conversation so far (messages end with the user's turn):
    (text, whether it ended with <|end|> within max_new_tokens)."""
    ids = prompt_ids(tok, messages)
    end = tok.special_tokens["<|end|>"]
    out = model.generate(ids, max_new_tokens, temperature=0, eot_id=end)[0, len(ids):].tolist()
    reply = out[:out.index(end)] if end in out else out
    clean = end in out and not set(reply) & set(tok.special_tokens.values())
    return tok.decode(reply), clean


@torch.no_grad()
def accuracy(model, tok, examples):
    """Exact-match accuracy of greedy replies to the last user turn: the reply must be the
    answer character for character, then <|end|>. Returns (overall, per task, replies)."""
    hits, replies = {}, []
    for msgs, _, task in examples:
        target = msgs[-1]["content"]
        replies.append(answer(model, tok, msgs[:-1], len(tok.encode_ordinary(target)) + 2))
        hits.setdefault(task, []).append(replies[-1] == (target, True))
    per_task = {t: sum(h) / len(h) for t, h in hits.items()}
    return sum(sum(h) for h in hits.values()) / len(examples), per_task, replies


def mistakes(examples, replies):
    """The model's own wrong (finished) replies as rejected answers: (messages, reply, task).

    This is how preference data is made: sample the model, let a judge (here an exact
    check) rank the replies. DPO then pushes down exactly what this model gets wrong.
    """
    return [(msgs, text, task) for (msgs, _, task), (text, done) in zip(examples, replies)
            if done and text != msgs[-1]["content"]]


def preference_pairs(tok, examples):
    """(chosen, rejected) (ids, mask) pairs from examples that carry a rejected answer."""
    pairs = []
    for msgs, rejected, _ in examples:
        if rejected is not None:
            bad = msgs[:-1] + [{"role": "assistant", "content": rejected}]
            pairs.append((encode_chat(tok, msgs), encode_chat(tok, bad)))
    return pairs


@torch.no_grad()
def preference_accuracy(model, pairs):
    """How often the model gives the chosen answer a higher log-probability than the rejected."""
    model.eval()
    wins = 0
    for i in range(0, len(pairs), 64):
        chunk = pairs[i:i + 64]
        x, y = collate([c for c, _ in chunk] + [r for _, r in chunk])
        lp = sequence_logp(model, x, y)
        wins += (lp[:len(chunk)] > lp[len(chunk):]).sum().item()
    return wins / len(pairs)


@torch.no_grad()
def val_loss(model, batches):
    """The pretraining objective on held-out text: how much plain language modelling is left."""
    model.eval()
    return sum(model(x, y)[1].item() for x, y in batches) / len(batches)


# ----------------------------------------------------------------------------- training
def optimize(model, examples, step_loss, iters, lr, batch_size, warmup=20, weight_decay=0.0,
             seed=0, log_every=100, dropout=True):
    """The loop SFT and DPO share: train.py's AdamW and its warmup + cosine schedule.
    step_loss(batch of examples) -> loss. Only parameters with requires_grad train.
    dropout=False trains in eval mode (dropout is all that train mode changes here): DPO's
    policy must compute what its reference does, or their log-ratio is noise at step 0."""
    decay, no_decay = gpt.param_groups(model, weight_decay)  # LoRA's A and B, or the matrices
    head = model.lm_head.weight  # an untied head's rows, as the embedding's: no decay (an old
    if any(p is head for p in decay["params"]):  # row frozen by train_new_rows stays as it was)
        decay["params"] = [p for p in decay["params"] if p is not head]
        no_decay["params"].append(head)
    groups = [decay, no_decay]
    params = [p for g in groups for p in g["params"]]
    opt = optim.AdamW(groups, lr=lr, betas=(0.9, 0.99))
    rng = random.Random(seed)
    model.train(dropout)
    t0 = time.time()
    for it in range(iters):
        for g in opt.param_groups:
            g["lr"] = gpt.lr_at(it, lr, lr / 10, warmup, iters)
        loss = step_loss(rng.sample(examples, min(batch_size, len(examples))))
        if not math.isfinite(loss.item()):  # stop before a nan reaches the weights or a file
            raise ValueError(f"loss {loss.item()} at iteration {it + 1}: lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (it + 1) % log_every == 0 or it + 1 == iters:
            print(f"  iter {it + 1:4d}/{iters} | loss {loss.item():.4f} | {time.time() - t0:.0f}s")
    model.eval()


def sft_step(model, replay=None, replay_weight=0.0):
    """SFT's loss for a batch of (ids, mask): next-token cross-entropy on assistant tokens.

    replay: a DataLoader of pretraining text; its loss, weighted, is added so that the model
    keeps practising plain language modelling while it learns the chat tasks (less forgetting).
    """
    def step_loss(batch):
        x, y = collate(batch)
        loss = model(x, y)[1]   # targets of -1 are skipped: user tokens add nothing
        if replay is not None and replay_weight > 0:
            loss = loss + replay_weight * model(*replay.next_batch())[1]
        return loss
    return step_loss


def dpo_step(policy, reference, beta, sft_weight=0.0):
    """DPO's loss for a batch of (chosen, rejected) pairs; the reference gets no gradient.
    sft_weight adds the chosen answers' per-token NLL, which keeps their probability up."""
    def step_loss(batch):
        x, y = collate([c for c, _ in batch] + [r for _, r in batch])
        n = len(batch)
        pi = sequence_logp(policy, x, y)            # chosen rows first, then rejected
        with torch.no_grad():
            ref = sequence_logp(reference, x, y)
        nll = -(pi[:n] / (y[:n] != -1).sum(-1)).mean()
        return dpo_loss(pi[:n], pi[n:], ref[:n], ref[n:], beta) + sft_weight * nll
    return step_loss


def dpo_reference(model, lora=None):
    """A frozen copy of model for DPO; model is the policy, with new adapters if lora."""
    reference = copy.deepcopy(model).requires_grad_(False)
    if lora:
        add_lora(model, *lora)
    return reference


# ----------------------------------------------------------------------------- checkpoints
def newest_checkpoint(folder):
    """The newest checkpoint that gpt.py (folder/gpt_*.pt) or train.py (folder/<run>/ckpt_*.pt)
    wrote, or None."""
    found = glob.glob(os.path.join(folder, "gpt_*.pt"))
    found += glob.glob(os.path.join(folder, "*", "ckpt_*.pt"))
    return max(found, key=os.path.getmtime, default=None)


def load_base(path, tok_path=""):
    """(model, tokenizer, pretraining data folder or None) from a checkpoint of gpt.py,
    train.py or this file (gpt.load_model reads them all, with the tokenizer they name unless
    tok_path). The data folder (dataloader.prepare's, with train/ and val/ shards) sits
    beside the tokenizer, or is the checkpoint's data_dir."""
    model, tok, ck = gpt.load_model(path, tok_path)
    if not isinstance(ck.get("data_dir", ""), str):
        raise ValueError(f"{path}: data_dir must be a path (a string)")
    tok_path = tok_path or os.path.join(os.path.dirname(path), ck["tokenizer"])
    return model, tok, ck.get("data_dir") or data_folder(tok_path, os.path.dirname(path))


def data_folder(tok_path, near):
    """The dataloader.prepare folder (train/ and val/ shards) made with this tokenizer: the
    tokenizer's own folder (train.py), or one under near/data holding the same file (gpt.py)."""
    same = [os.path.dirname(t) for t in glob.glob(os.path.join(near, "data", "*", "tokenizer.json"))
            if filecmp.cmp(t, tok_path, shallow=False)]
    return next((f for f in [os.path.dirname(tok_path)] + same
                 if glob.glob(os.path.join(f, "val", "*.bin"))), None)


def pretrain_tiny(folder, iters):
    """No checkpoint yet: train.py's "cpu" preset for a few hundred steps, as the base model."""
    c = train.make_config(out_dir=os.path.join(folder, "cpu"),
                          data_dir=os.path.join(folder, "data"), block_size=128, max_iters=iters,
                          eval_interval=iters, save_interval=iters,
                          log_interval=max(1, iters // 5), sample_tokens=0)
    return train.train(c)["checkpoint"]


def val_batches(folder, block_size, n=8, batch=16):
    """A fixed list of (x, y) windows from the pretraining val split, to track forgetting."""
    if folder is None:
        return []
    loader = dataloader.DataLoader(os.path.join(folder, "val"), batch, block_size, seed=0)
    return [loader.next_batch() for _ in range(min(n, loader.windows // batch or 1))]


# ----------------------------------------------------------------------------- demo
def check_fits(tok, examples, block_size, source):
    """Encode every conversation once. For user data a character the vocabulary lacks, or a
    conversation longer than the context, is an error; such synthetic ones are dropped."""
    kept = []
    for i, (msgs, rejected, task) in enumerate(examples):
        try:
            n = len(encode_chat(tok, msgs)[0])
            if rejected is not None:
                encode_chat(tok, msgs[:-1] + [{"role": "assistant", "content": rejected}])
        except ValueError as e:
            if source == "synthetic":
                continue
            raise ValueError(f"{source}: conversation {i + 1}: {e}") from None
        if n - 1 <= block_size:  # the inputs are all tokens but the last
            kept.append((msgs, rejected, task))
        elif source != "synthetic":
            raise ValueError(f"{source}: conversation {i + 1} needs {n} tokens, more than the "
                             f"model's context of {block_size}")
    return kept


def check_options(g):
    """Every option's range (g: this module's globals), before minutes of loading and training."""
    cli.one_of("method", g["method"], METHODS)
    if not g["data"]:
        for name in [t for t in g["tasks"].split(",") if t]:
            cli.one_of("task", name, TASKS)
    cli.check(g, [(n, g[n] >= 1, "at least 1") for n in (
        "pretrain_iters", "lora_rank", "batch_size", "sft_iters", "dpo_iters")] + [
        (n, g[n] >= 0, ">= 0") for n in (
            "dpo_prompts", "dpo_sft", "weight_decay", "warmup_iters", "num_samples")] + [
        (n, g[n] > 0, "above 0") for n in ("sft_lr", "dpo_lr", "dpo_beta", "lora_alpha")] + [
        ("n_train", 1 <= g["n_train"] <= 10**6, "in [1, 10**6]"),
        ("n_eval", 1 <= g["n_eval"] <= 10**5, "in [1, 10**5]"),
        ("eval_frac", 0 < g["eval_frac"] < 1, "between 0 and 1"),
        ("lora_dropout", 0 <= g["lora_dropout"] < 1, "in [0, 1)"),
        ("lora_targets", any(g["lora_targets"].split(",")), "a list of layer names"),
        ("replay", 0 <= g["replay"] <= 1, "in [0, 1] (the pretraining loss's weight)"),
        ("seed", 0 <= g["seed"] < 2**32, "in [0, 2**32)"),
        ("threads", 0 <= g["threads"] <= cli.MAX_THREADS, f"in [0, {cli.MAX_THREADS}] (0: torch's choice)"),
        ("out_dir", g["out_dir"] != "", "a folder")])


def main():
    """The demo, stage by stage: data, the base model, SFT, DPO, sample replies, save."""
    t_start = time.time()
    check_options(globals())
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    examples, held_out = read_examples()  # a bad file fails before minutes of work
    with train.hold_out_dir(os.path.join(out_dir, "finetune")) as folder:  # one run at a time
        model, tok, path, data_dir, first_new = base_stage()
        train_set, held_out = fit_examples(tok, examples, held_out, model.config.block_size)
        val = val_batches(data_dir, model.config.block_size)
        if not val:
            print("no pretraining val split found next to the tokenizer: forgetting is not measured")
        measure(model, tok, held_out, val, "base model")
        sft_stage(model, tok, first_new, train_set, data_dir)
        replies = measure(model, tok, held_out, val, f"after SFT ({method})")
        dpo_stage(model, tok, train_set, held_out, replies, val)
        sample_stage(model, tok, held_out)
        gpt.save_checkpoint(os.path.join(folder, "ckpt.pt"), model, tokenizer="tokenizer.json",
                            data_dir=data_dir or "", base=path)
        tok.save(os.path.join(folder, "tokenizer.json"))
    print(f"saved {folder}/ckpt.pt and tokenizer.json | {time.time() - t_start:.0f}s in all")


def read_examples():
    """(conversations, None) from --data (split once encoded), or the synthetic (train, held-out)."""
    if data:
        examples = read_conversations(data)
        if len(examples) < 2:
            raise ValueError(f"{data}: need at least 2 conversations (one to train, one held out)")
        return examples, None
    return synthetic_tasks([t for t in tasks.split(",") if t], n_train, n_eval, seed)


def base_stage():
    """The base model and its tokenizer, grown by the chat tokens: (model, tokenizer, the
    checkpoint's path, its pretraining data folder, the first new token id)."""
    path = init or newest_checkpoint(out_dir)
    if path is None:
        print(f"no checkpoint under {out_dir}/: pretraining a tiny model first "
              f"({pretrain_iters} steps of train.py's cpu preset)")
        path = pretrain_tiny(out_dir, pretrain_iters)
    model, tok, data_dir = load_base(path, tokenizer)
    first_new = tok.vocab_size
    tok = add_chat_tokens(tok)
    model = grow_vocab(model, tok.vocab_size)
    cli.fits_in_memory(gpt.train_bytes(model.config, batch_size) * 2,  # DPO: chosen + rejected
                       f"--batch_size={batch_size} with {path}")
    print(f"base model {path}: {model.num_params():,} parameters | chat tokens "
          + ", ".join(f"{s}={tok.special_tokens[s]}" for s in CHAT_TOKENS)
          + f" | vocabulary {first_new} -> {tok.vocab_size}")
    return model, tok, path, data_dir, first_new


def fit_examples(tok, examples, held_out, block):
    """(train set, held-out set) of the conversations that fit the model's context; user data
    (held_out None) is shuffled and split by eval_frac here."""
    if held_out is None:
        examples = check_fits(tok, examples, block, data)
        random.Random(seed).shuffle(examples)
        k = min(max(1, round(eval_frac * len(examples))), len(examples) - 1)  # both sides: >= 1
        held_out, examples = examples[:k], examples[k:]
    else:  # (a model with a short context may have to skip some)
        examples = check_fits(tok, examples, block, "synthetic")
        held_out = check_fits(tok, held_out, block, "synthetic")
        if not (examples and held_out):
            raise ValueError(f"no synthetic question fits in the context of {block} tokens")
    print(f"{len(examples)} training conversations, {len(held_out)} held out")
    return examples, held_out


def measure(model, tok, held_out, val, stage):
    """Print exact-match accuracy on the held-out questions and the pretraining val loss;
    returns the replies (DPO's wrong answers come from them)."""
    acc, per, replies = accuracy(model, tok, held_out)
    loss = val_loss(model, val) if val else float("nan")
    detail = ", ".join(f"{t} {a:.0%}" for t, a in per.items())
    print(f"== {stage}: exact match {acc:.1%} ({detail}) | pretraining val loss {loss:.4f}")
    return replies


def sft_stage(model, tok, first_new, train_set, data_dir):
    """SFT in place: LoRA adapters (merged at the end) plus the new token rows, or all weights."""
    total = model.num_params()
    if method == "lora":
        adapters = add_lora(model, *lora_settings())
        hooks = train_new_rows(model, first_new)
        n_lora = sum(a.A.numel() + a.B.numel() for a in adapters)
        n_rows = len(hooks) * (tok.vocab_size - first_new) * model.config.n_embd
        print(f"SFT with LoRA r={lora_rank}, alpha={lora_alpha:g} on {len(adapters)} layers: "
              f"{n_lora:,} adapter parameters + {n_rows:,} in the new token rows (embedding"
              f"{'' if model.config.tie_embeddings else ' and head'}) train, "
              f"{total:,} pretrained ones are frozen")
    else:
        model.requires_grad_(True)
        print(f"SFT, full finetuning: all {total:,} parameters train")
    replay_data = None
    if replay > 0 and data_dir and glob.glob(os.path.join(data_dir, "train", "*.bin")):
        n = max(1, batch_size // 4)
        replay_data = dataloader.DataLoader(os.path.join(data_dir, "train"), n,
                                            model.config.block_size, sampler="random", seed=seed)
        print(f"replay: each step adds {replay:g} x the loss on {n} windows of pretraining text")
    elif replay > 0:
        print("replay off: no pretraining train split found next to the tokenizer")
    encoded = [encode_chat(tok, msgs) for msgs, _, _ in train_set]
    optimize(model, encoded, sft_step(model, replay_data, replay), sft_iters, sft_lr,
             batch_size, warmup_iters, weight_decay, seed)
    if method == "lora":
        for hook in hooks:
            hook.remove()
        x, _ = collate(encoded[:16])
        with torch.no_grad():
            before = model(x)[0]
            merge_lora(model)
            diff = (model(x)[0] - before).abs().max().item()
        print(f"merged the adapters into the weights: logits change by at most {diff:.1e}")


def lora_settings():
    """(targets, rank, alpha, dropout) for add_lora, from the options."""
    return [t for t in lora_targets.split(",") if t], lora_rank, lora_alpha, lora_dropout


def dpo_stage(model, tok, train_set, held_out, replies, val):
    """DPO in place against a frozen copy of the SFT model. Pairs: the JSONL's "rejected"
    answers, or else the SFT model's own mistakes (on dpo_prompts training questions; those
    on the held-out ones, from replies, to evaluate)."""
    if data:
        pairs, pairs_eval = preference_pairs(tok, train_set), preference_pairs(tok, held_out)
    else:
        asked = random.Random(seed).sample(train_set, min(dpo_prompts, len(train_set)))
        pairs = preference_pairs(tok, mistakes(asked, accuracy(model, tok, asked)[2]))
        pairs_eval = preference_pairs(tok, mistakes(held_out, replies))
    if not (pairs and pairs_eval):
        print("DPO skipped: no (right, wrong) answer pairs to learn from")
        return
    pref0 = preference_accuracy(model, pairs_eval)  # the reference's: model before DPO
    print(f"DPO on {len(pairs)} (right answer, wrong answer) pairs, beta={dpo_beta:g}"
          + (f", plus {dpo_sft:g} x the right answers' NLL" if dpo_sft else ""))
    dpo_train(model, pairs, lora_settings() if method == "lora" else None)
    merge_lora(model)
    print(f"== DPO: the right answer scores above the wrong one on {pref0:.1%} -> "
          f"{preference_accuracy(model, pairs_eval):.1%} of {len(pairs_eval)} held-out pairs")
    measure(model, tok, held_out, val, "after DPO")


def dpo_train(model, pairs, lora=None):
    """DPO in place (with new LoRA adapters if lora) against a frozen copy of model, returned.
    Dropout is off in the policy as in the reference (base and LoRA dropout alike): at step 0
    both are one function, every margin is 0 and the loss is log 2, as DPO's reward assumes."""
    reference = dpo_reference(model, lora)
    optimize(model, pairs, dpo_step(model, reference, dpo_beta, dpo_sft), dpo_iters, dpo_lr,
             max(1, batch_size // 2), warmup_iters, weight_decay, seed + 1, dropout=False)
    return reference


def sample_stage(model, tok, held_out):
    """A few held-out conversations, answered greedily, beside the expected answer."""
    for msgs, _, _ in held_out[:: max(1, len(held_out) // max(1, num_samples))][:num_samples]:
        text, done = answer(model, tok, msgs[:-1])
        print(f"---- user: {msgs[-2]['content']}\n     assistant: {text}"
              + ("" if done else " [no <|end|>]") + f"   (expected: {msgs[-1]['content']})")


if __name__ == "__main__":
    cli.run(main, globals())
