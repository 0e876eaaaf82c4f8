"""exercises.py - build it yourself: take a function out, write it again, let the tests grade it.

Each exercise is about one sitting (an hour or less), in the order of the path: which functions
to write, the tests that grade them (the same tests that hold our code to torch, tiktoken and
transformers), one hint, and roughly how long. Starting one writes a learner's copy of the
project with those functions' bodies replaced by `raise NotImplementedError("exercise N ...")`:
the docstring stays, every other line of every file is untouched, and everything still imports.

    python exercises.py                          # the exercises in order, and how far you are
    python exercises.py --start=autograd-ops     # (or --start=1) blank them in your copy
    python exercises.py --check=autograd-ops     # run the tests that grade it, in your copy
    python exercises.py --folder=~/my-copy --start=bpe-merge

The copy lives beside this project (../nanollm-exercises by default) so its tests find
../shared/data just as ours do. Exercises build on each other: starting the next one blanks
only its own functions and keeps your earlier answers. Your answers are never lost: starting
an exercise whose functions hold your edits refuses, unless --force=true says to blank them.

For maintainers, `--verify=all` (or a list of ids) shows each grader is real: on a fresh copy
the untouched functions pass every graded test (none skipped), and with the exercise blanked
each graded test fails on that exercise's NotImplementedError. It runs every exercise's tests
twice (several minutes).
"""
import ast
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import cli

ROOT = Path(__file__).resolve().parent

# python exercises.py --name=value
start = ""        # an exercise id or number: write it into your copy (its functions blanked)
check = ""        # exercise ids or numbers, comma-separated: run the tests that grade them
folder = ""       # your copy ("" = nanollm-exercises beside this project, sharing ../shared/data)
force = False     # with --start: blank the functions even where they hold your edits (lost)
verify = ""       # maintainers: "all" or ids, comma-separated: is each grader real?
timeout = 1800    # seconds one check may run before it is stopped

MARKER = ".nanollm-exercises"  # in a learner's copy: the project it was copied from
TESTS = "test_all.py"
COPIED = (".py", ".md", ".txt")  # the project's files a copy holds (and all of docs/)


@dataclass(frozen=True)
class Exercise:
    id: str              # what --start= and --check= take (or the number, from 1)
    title: str
    file: str            # the file whose functions are blanked
    functions: tuple     # qualified names in that file: "merge", "Value._topo"
    tests: tuple         # test functions in test_all.py that grade it (all their parameters)
    reference: str       # what those tests hold your answer to, in plain words
    hint: str
    minutes: int


# The path's order. A renamed function or test breaks test_exercises_table_names_real_code,
# which names the exercise to update here.
EXERCISES = [
    Exercise("autograd-ops", "the backward of five scalar ops", "micrograd.py",
             ("Value._mul_backward", "Value._div_backward", "Value._exp_backward",
              "Value._tanh_backward", "Value._sigmoid_backward"),
             ("test_micrograd_value_ops_match_torch",),
             "torch autograd in float64",
             "out._prev holds the inputs; add g times d(out)/d(input) to each input's .grad "
             "(+=, never =: an input used twice gets both). exp and tanh and sigmoid can reuse "
             "out.data.", 40),
    Exercise("autograd-backward", "the topological sort and backward()", "micrograd.py",
             ("Value._topo", "Value.backward"),
             ("test_micrograd_value_ops_match_torch", "test_micrograd_value_chain_of_100k_ops",
              "test_micrograd_value_repeated_backward", "test_micrograd_tensor_binary_broadcast"),
             "torch autograd in float64",
             "A node goes into the order after all of its inputs. Recursion stops near 1,000 "
             "levels and one test builds a chain of 100,000 ops: keep your own stack. In "
             "backward, zero the interior nodes' grads first (not the leaves').", 60),
    Exercise("tensor-broadcast", "the Tensor engine's backward, with broadcasting", "micrograd.py",
             ("Tensor._acc", "Tensor.backward"),
             ("test_micrograd_tensor_binary_broadcast", "test_micrograd_tensor_random_shapes",
              "test_micrograd_tensor_chain_and_repeated_backward",
              "test_micrograd_tensor_leaf_grads_are_separate_writable_arrays",
              "test_micrograd_tensor_constants_get_no_gradient"),
             "torch autograd in float64",
             "A gradient arriving with a broadcast shape is summed back to the input's shape: "
             "over the extra leading axes, then (keepdims) over the axes where the input has "
             "size 1. Value._topo walks Tensors too.", 60),
    Exercise("bpe-merge", "the pair merge", "bpe.py", ("merge",),
             ("test_bpe_merge_equals_bytes_replace", "test_bpe_tie_break_hand_computed"),
             "Python's bytes.replace and the CS336 hand-computed merges",
             "Walk left to right; when ids[i], ids[i+1] is the pair, emit new and jump 2. "
             "\"aaa\" with (a, a) is [new, a], not [a, new].", 20),
    Exercise("bpe-train", "the incremental BPE trainer", "bpe.py", ("train_fast",),
             ("test_bpe_tie_break_hand_computed", "test_bpe_incremental_trainer_equals_naive"),
             "train_naive's merges (the same list, in the same order)",
             "Count pairs once, remember which words hold each pair, and after a merge update "
             "only those words' pair counts. Ties go to the pair whose bytes sort highest: "
             "read reverse_order and train_naive before you start.", 60),
    Exercise("bpe-encode", "encoding a pre-token with the merge ranks", "bpe.py",
             ("Tokenizer.bpe_simple",),
             ("test_bpe_gpt2_ids_equal_tiktoken_and_hf", "test_bpe_trained_vocab_encodes_identically_in_tiktoken",
              "test_bpe_heap_merge_equals_simple_merge"),
             "tiktoken and HF tokenizers on GPT-2's vocabulary",
             "Not the order of the text: repeatedly merge the adjacent pair whose id in "
             "self.merges is lowest (learned earliest), leftmost on a tie, until no pair is in "
             "self.merges. piece.translate(self.byte_table) gives the byte ids.", 45),
    Exercise("data-batches", "an epoch's windows as batches", "dataloader.py",
             ("DataLoader.next_batch", "DataLoader.full_pass"),
             ("test_dataloader_epoch_sees_every_window_once", "test_dataloader_empty_shards_hold_no_windows",
              "test_dataloader_random_sampler_is_nanogpts"),
             "every window of every shard exactly once per epoch, counted by hand",
             "self._windows(pos) gives global window ids; self.first[s] is shard s's first "
             "one (np.searchsorted finds the shard). An epoch window j of a shard starts at "
             "token j * T; a random-sampler id is already a start.", 45),
    Exercise("data-ddp", "shuffled epochs, split disjointly over ranks", "dataloader.py",
             ("DataLoader._permutation", "DataLoader._windows"),
             ("test_dataloader_epoch_sees_every_window_once", "test_dataloader_ranks_are_disjoint_and_cover_the_epoch",
              "test_dataloader_resume_mid_epoch_is_exact", "test_dataloader_random_sampler_is_nanogpts"),
             "the single-process loader: the ranks together must serve exactly its windows",
             "Lay the epochs end to end as one stream; step k takes positions [k*B*W, "
             "(k+1)*B*W) and rank r the r-th B of them. One step can straddle two epochs. "
             "Seed each epoch's permutation with [seed, epoch].", 60),
    Exercise("block-attention", "causal attention, readable", "block.py",
             ("CausalSelfAttention.attend_readable",),
             ("test_block_readable_attention_equals_sdpa", "test_block_kv_cache_equals_recompute"),
             "torch's scaled_dot_product_attention",
             "softmax(q k^T / sqrt(d)) v, with -inf where a key lies after the query. With a "
             "cache, q holds the last T of S positions: query t sits at S - T + t. GQA: repeat "
             "each K/V head n_head // n_kv_head times.", 45),
    Exercise("block-rope", "rotary position embeddings", "block.py", ("rope_tables", "apply_rope"),
             ("test_block_llama_block_matches_decoder_layer", "test_gpt_llama_logits_match_transformers"),
             "transformers' Llama decoder layer and model",
             "Angle = position * theta^(-2i/d) for i < d/2, and channel i rotates with channel "
             "i + d/2 (HF's rotate_half layout, not neighbours). Keep the angles in float32.", 45),
    Exercise("block-kv-cache", "the KV cache", "block.py", ("KVCache.update",),
             ("test_block_kv_cache_equals_recompute", "test_gpt_cached_generation_equals_uncached"),
             "the same block run without a cache",
             "Write the new keys and values at positions n..n+T of the preallocated buffers and "
             "return everything up to n+T. Too many positions is a ValueError the test reads.", 30),
    Exercise("gpt-init", "GPT-2's initialisation and the logits", "gpt.py",
             ("GPT._init_weights", "GPT.head"),
             ("test_gpt_gpt2_init_has_transformers_statistics", "test_gpt_initial_loss_near_ln_vocab",
              "test_gpt_gpt2_logits_match_transformers", "test_gpt_logit_softcap_bounds_logits_and_gradients_match_autograd"),
             "GPT2LMHeadModel's random init and logits (transformers)",
             "Linear and Embedding weights ~ N(0, 0.02), Linear biases 0 (__init__ rescales "
             "c_proj after you). The head cuts the padded vocabulary rows off, then applies the "
             "softcap C * tanh(logits / C) when C is set.", 30),
    Exercise("gpt-sampling", "temperature, top-k and top-p sampling", "gpt.py", ("sample", "truncate"),
             ("test_gpt_top_k_top_p_match_transformers_warpers", "test_gpt_sample_temperature_zero_is_argmax",
              "test_gpt_temperature_matches_transformers_warper", "test_gpt_sampling_refuses_nonfinite_logits",
              "test_gpt_generate_is_seedable_and_stops_at_eot"),
             "transformers' TopKLogitsWarper, TopPLogitsWarper and temperature warper",
             "top-p: sort descending, and drop a token once the likelier ones before it already "
             "reach top_p (the first always stays); scatter the mask back to vocabulary order.", 45),
    Exercise("optim-adamw", "AdamW's step", "optim.py", ("AdamW.step_group",),
             ("test_optim_adamw_matches_torch_step_for_step",
              "test_optim_muon_matches_torch_muon_and_adamw_step_for_step"),
             "torch.optim.AdamW, step for step",
             "Decoupled weight decay: p *= 1 - lr * wd before the Adam update. Bias-correct both "
             "moments with the step count t (from 1); eps goes outside the square root.", 45),
    Exercise("train-schedule", "the learning-rate schedule", "gpt.py", ("lr_at",),
             ("test_train_lr_schedules_match_formulas",),
             "the warmup, cosine and WSD formulas evaluated by hand",
             "Warmup: lr * (step + 1) / (warmup_iters + 1). Cosine from lr to min_lr over the "
             "remaining steps; wsd holds lr, then decays linearly over the last decay_frac.", 25),
    Exercise("train-accum", "one optimizer step with gradient accumulation", "train.py", ("train_step",),
             ("test_train_grad_accum_equals_one_big_batch", "test_train_loss_falls",
              "test_train_clipping_equals_torch_clip_grad_norm_and_adamw"),
             "one big batch: 2 micro-batches of 4 must give the losses and weights of 1 of 8",
             "Each micro-batch's loss is divided by s.accum before backward, so the gradients "
             "add up to the mean. Clip after unscaling, check finiteness before stepping, then "
             "zero the gradients.", 60),
    Exercise("finetune-sft", "the chat format and the SFT loss mask", "finetune.py",
             ("encode_chat", "collate"),
             ("test_finetune_sft_mask_user_tokens_get_no_gradient",),
             "cross-entropy over the assistant's tokens only, computed by hand",
             "mask[i] = 1 for the assistant's text and its <|end|>, 0 for the role tokens and "
             "the user's. Targets are the tokens shifted by one, and -1 (ignored) where the "
             "mask of the target token is 0 and in the padding.", 45),
    Exercise("finetune-lora", "LoRA", "finetune.py", ("LoRALinear.forward", "LoRALinear.merged"),
             ("test_finetune_lora_forward_equals_formula", "test_finetune_lora_merge_gives_same_logits",
              "test_finetune_lora_zero_init_is_a_no_op_and_counts_adapters"),
             "the formula W x + b + (alpha / r) B A x, and the merged model's logits",
             "forward adds self.scale * (dropout(x) @ A^T @ B^T) to the frozen base; merged "
             "returns a plain nn.Linear holding W + scale * B @ A (and the base's bias).", 30),
    Exercise("finetune-dpo", "the DPO loss", "finetune.py", ("sequence_logp", "dpo_loss"),
             ("test_finetune_dpo_loss_matches_direct_formula",),
             "the DPO formula computed one sequence at a time with plain floats",
             "sequence_logp sums log p of each target token where y != -1 (gather on the "
             "log-softmax). The loss is -log sigmoid(beta * margin), the margin being how much "
             "more the policy than the reference prefers chosen over rejected.", 40),
    Exercise("primer-tiled-matmul", "a tiled matmul and its memory loads", "cuda_primer.py",
             ("tiled_matmul", "tiled_loads"),
             ("test_cuda_primer_tiled_matmul_equals_numpy_and_counts_loads",),
             "numpy's A @ B, and the load count worked out by hand",
             "One output tile at a time; march along K one pair of input tiles at a time and "
             "count the elements of each tile you load. Edge tiles are smaller.", 30),
    Exercise("primer-online-softmax", "online softmax and FlashAttention in numpy", "cuda_primer.py",
             ("online_softmax", "flash_attention"),
             ("test_cuda_primer_online_softmax_equals_torch", "test_cuda_primer_flash_and_naive_attention_equal_torch"),
             "torch.softmax and torch's scaled_dot_product_attention",
             "Keep a running max m and a running sum l; when m grows, multiply what you have "
             "summed by exp(m_old - m_new). In attention the unnormalised output is rescaled "
             "the same way; divide by l at the end.", 60),
    Exercise("triton-flash-forward", "the FlashAttention forward kernel in Triton", "kernels.py",
             ("_attn_fwd",),
             ("test_kernels_flash_forward_equals_readable_attention",),
             "the readable attention in torch (and block.py's attend_readable)",
             "Runs under Triton's interpreter on CPU. Load one query tile, loop over key tiles "
             "up to the causal end with tl.load masks, keep m, l, acc per row in base 2 "
             "(exp2, scale folded with log2 e), then store O and the natural-log LSE.", 75),
]


# ----------------------------------------------------------------------------- blanking

def find_function(tree, qualname):
    """The FunctionDef of "Class.method" or "function" at the top of a module, or None."""
    body = tree.body
    node = None
    for part in qualname.split("."):
        node = next((n for n in body if isinstance(n, (ast.ClassDef, ast.FunctionDef))
                     and n.name == part), None)
        if node is None:
            return None
        body = node.body
    return node if isinstance(node, ast.FunctionDef) else None


def has_docstring(fn):
    first = fn.body[0]
    return isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
        and isinstance(first.value.value, str)


def body_span(fn, where):
    """(first, last): the 1-based lines holding fn's body after its docstring (comments
    between the signature and the first statement included: they may give the answer away)."""
    keep = 1 if has_docstring(fn) else 0
    if len(fn.body) == keep:
        raise ValueError(f"{where}: {fn.name} has nothing but a docstring to blank")
    signature = [fn.args] + ([fn.returns] if fn.returns else [])
    sig_end = max([fn.lineno] + [n.end_lineno for node in signature for n in ast.walk(node)
                                 if getattr(n, "end_lineno", None)])
    if fn.body[0].lineno <= sig_end:
        raise ValueError(f"{where}: {fn.name} has its body on the def line; cannot blank it")
    first = fn.body[0].end_lineno + 1 if keep else sig_end + 1
    return first, fn.end_lineno


def stub_line(ex, qualname, indent):
    n = EXERCISES.index(ex) + 1
    return (f'{indent}raise NotImplementedError("exercise {n} ({ex.id}): write {qualname}; '
            f'then python exercises.py --check={ex.id}")\n')


def parse(text, where):
    try:
        return _parse(text)
    except SyntaxError as e:
        raise ValueError(f"{where}: line {e.lineno}: {e.msg}; fix it, then try again") from None


@functools.lru_cache(maxsize=64)
def _parse(text):  # the listing asks about the same few files dozens of times; trees are only read
    return ast.parse(text)


def body_text(text, qualname, where):
    """The lines of qualname's body after its docstring, or None if the file has no such
    function."""
    fn = find_function(parse(text, where), qualname)
    if fn is None:
        return None
    first, last = body_span(fn, where)
    return "".join(text.splitlines(keepends=True)[first - 1:last])


def blank(text, ex, names, where):
    """text with the bodies of names (functions of ex) replaced by one raise each."""
    tree = parse(text, where)
    lines = text.splitlines(keepends=True)
    spans = []
    for name in names:
        fn = find_function(tree, name)
        if fn is None:
            raise ValueError(f"{where} has no function {name} (exercise {ex.id})")
        first, last = body_span(fn, where)
        indent = " " * fn.body[-1].col_offset  # the body's own indentation
        spans.append((first, last, stub_line(ex, name, indent)))
    for first, last, stub in sorted(spans, reverse=True):  # bottom up: line numbers stay valid
        lines[first - 1:last] = [stub]
    return "".join(lines)


# ----------------------------------------------------------------------------- the copy

def lookup(text):
    """An exercise by id or by its number (from 1)."""
    if text.isdigit() and 1 <= int(text) <= len(EXERCISES):
        return EXERCISES[int(text) - 1]
    for ex in EXERCISES:
        if ex.id == text:
            return ex
    cli.one_of("exercise", text, [e.id for e in EXERCISES])


def copy_folder():
    return Path(os.path.expanduser(folder)) if folder else ROOT.parent / "nanollm-exercises"


def project_files():
    """The project's files a learner's copy holds, relative to ROOT."""
    files = [p for p in ROOT.iterdir() if p.is_file() and p.suffix in COPIED]
    files += [p for p in (ROOT / "docs").rglob("*") if p.is_file()]
    return sorted(p.relative_to(ROOT) for p in files if not p.name.startswith("."))


def is_copy(dest):
    return (dest / MARKER).is_file()


def check_folder(dest):
    """A folder that exists, is not empty and is not a copy is refused: it may be someone's
    work."""
    if dest.exists() and not dest.is_dir():
        raise ValueError(f"--folder={dest}: is a file, not a folder")
    if dest.is_dir() and any(dest.iterdir()) and not is_copy(dest):
        raise ValueError(f"--folder={dest}: not empty and not a copy made by exercises.py "
                         f"(no {MARKER}); choose a new or empty folder")


def fill_copy(dest):
    """Create the copy, or add the project files it lacks; never touches a file already there.
    The caller has checked the folder (check_folder)."""
    added = []
    for rel in project_files():
        if not (dest / rel).exists():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
            added.append(rel)
    (dest / MARKER).write_text(f"{ROOT}\n")
    return added


def function_states(ex, dest):
    """{qualname: "original" | "blank" | "edited" | "missing"} of ex's functions in the copy."""
    where = dest / ex.file
    mine = where.read_text(encoding="utf-8") if where.is_file() else None
    ours = (ROOT / ex.file).read_text(encoding="utf-8")
    blanked = blank(ours, ex, ex.functions, ex.file)
    states = {}
    for name in ex.functions:
        body = body_text(mine, name, where) if mine is not None else None
        if body is None:
            states[name] = "missing"
        elif body.strip() == body_text(blanked, name, ex.file).strip():
            states[name] = "blank"
        elif body == body_text(ours, name, ex.file):
            states[name] = "original"
        else:
            states[name] = "edited"
    return states


def start_exercise(ex, dest, overwrite=False):
    """Blank ex's functions in the copy at dest (made or completed first); returns the names
    blanked. Functions holding the learner's edits are refused unless overwrite."""
    dest = Path(dest)
    check_folder(dest)  # before hold_dir creates the folder and its lock
    with cli.hold_dir(dest):
        fill_copy(dest)
        states = function_states(ex, dest)
        missing = [n for n, s in states.items() if s == "missing"]
        if missing:
            raise ValueError(f"{dest / ex.file} has no {', '.join(missing)}: restore it from "
                             f"{ROOT / ex.file}")
        edited = [n for n, s in states.items() if s == "edited"]
        if edited and not overwrite:
            raise ValueError(f"{dest / ex.file}: {', '.join(edited)} hold your edits, left as "
                             f"they are; --force=true blanks them (that code is lost)")
        names = [n for n, s in states.items() if s != "blank"]
        if names:
            path = dest / ex.file
            text = blank(path.read_text(encoding="utf-8"), ex, names, path)
            with cli.atomic_open(path) as f:
                f.write(text.encode("utf-8"))
    return names


# ----------------------------------------------------------------------------- grading

def run_tests(ex_tests, dest, report, limit):
    """Run test functions of dest/test_all.py in a fresh interpreter; results as a list of
    (test id, "passed" | "failed" | "skipped", message, seconds)."""
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=short",
            f"--junitxml={report}", *(f"{TESTS}::{t}" for t in ex_tests)]
    try:
        done = subprocess.run(args, cwd=dest, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        raise ValueError(f"the tests ran past --timeout={limit} seconds and were stopped "
                         "(an endless loop?)") from None
    if not Path(report).is_file():  # pytest could not even start: show why
        raise ValueError("the tests did not run: " + (done.stdout + done.stderr).strip()[-2000:])
    return read_report(report)


def read_report(report):
    """(test id, outcome, message, seconds) per test case of a pytest --junitxml file."""
    results = []
    for case in ET.parse(report).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = "skipped" if tag == "skipped" else "failed"
                message = f"{node.get('message') or ''}\n{node.text or ''}".strip()  # summary, details
                break
        results.append((case.get("name"), outcome, message, float(case.get("time") or 0)))
    return results


def plain_words(ex, outcome, message):
    """One failure or skip, said plainly: which exercise is still blank, or which reference
    disagreed with the learner's answer."""
    stub = re.search(r"NotImplementedError: exercise (\d+) \(([\w-]+)\): write ([\w.]+)", message)
    if outcome == "skipped":
        return (f"did not run ({message}); a skipped test grades nothing: see "
                "docs/exercises.md for the data it needs")
    if stub:
        which = "" if stub[2] == ex.id else f" (from exercise {stub[1]}, {stub[2]})"
        return f"{stub[3]} is not written yet{which}"
    first = message.strip().splitlines()[0] if message.strip() else "failed"
    return f"your answer disagrees with {ex.reference}: {first[:300]}"


def grade(todo, dest, limit=1800):
    """Run the tests of the exercises in todo on the copy at dest, in one pytest run:
    [(exercise, passed, lines to print)]."""
    for path in sorted(dest.glob("*.py")):  # a typo is one line here, not a pytest dump
        parse(path.read_text(encoding="utf-8"), path)
    tests = list(dict.fromkeys(t for ex in todo for t in ex.tests))
    with tempfile.TemporaryDirectory() as tmp:
        results = run_tests(tests, dest, Path(tmp) / "report.xml", limit)
    for name, _, message, _ in results:
        if name.split("[")[0] not in tests:  # pytest reports a failed import as a test of its own
            last = [line for line in message.splitlines() if line.startswith("E ")][-1:] or [message]
            raise ValueError(f"the tests could not start ({name}): {last[0][1:].strip()[:300]}")
    return [verdict(ex, [r for r in results if r[0].split("[")[0] in ex.tests]) for ex in todo]


def verdict(ex, results):
    """(ex, passed, lines) from the results of ex's tests: each failure in plain words."""
    bad = [(name, plain_words(ex, outcome, msg)) for name, outcome, msg, _ in results
           if outcome != "passed"]
    ran = {name.split("[")[0] for name, *_ in results}
    lost = [t for t in ex.tests if t not in ran]  # renamed or deleted in the learner's copy
    bad += [(t, f"not found in {TESTS}; restore it from {ROOT / TESTS}") for t in lost]
    if not bad:
        return ex, True, [f"exercise {ex.id}: passed, {len(results)} test cases agree with "
                          f"{ex.reference}"]
    lines = [f"exercise {ex.id}: not yet, {len(bad)} of {len(results) + len(lost)} test cases "
             "do not pass:"]
    lines += [f"  {name}: {why}" for name, why in bad[:20]]
    if len(bad) > 20:
        lines.append(f"  ... and {len(bad) - 20} more")
    return ex, False, lines


def verify_exercises(todo, limit):
    """Each grader in todo is real: untouched, every graded test passes (none skipped: one
    run for them all); blanked, every test function of the exercise fails in at least one
    case, on that exercise's own NotImplementedError. Yields (exercise id or "untouched",
    problems)."""
    with tempfile.TemporaryDirectory() as tmp:
        if (ROOT.parent / "shared").is_dir():  # copies in tmp find ../shared/data like ours
            os.symlink(ROOT.parent / "shared", Path(tmp) / "shared")
        clean = Path(tmp) / "untouched"
        fill_copy(clean)
        tests = list(dict.fromkeys(t for ex in todo for t in ex.tests))
        results = run_tests(tests, clean, Path(tmp) / "all.xml", limit)
        for ex in todo:  # the tests' own time: what one --check costs beyond starting pytest
            secs = sum(r[3] for r in results if r[0].split("[")[0] in ex.tests)
            print(f"  {ex.id}: {len(ex.tests)} tests, {secs:.1f} s", flush=True)
        yield "untouched", [f"{name} {outcome}: {msg[:200]}" for name, outcome, msg, _
                            in results if outcome != "passed"]
        for ex in todo:
            dest = Path(tmp) / ex.id
            shutil.copytree(clean, dest)
            start_exercise(ex, dest)
            results = run_tests(ex.tests, dest, Path(tmp) / f"{ex.id}.xml", limit)
            yield ex.id, [f"blanked, {t} does not fail on exercise {ex.id}'s NotImplementedError"
                          " (it does not grade these functions)" for t in ex.tests
                          if not any(r[0].split("[")[0] == t and f"({ex.id})" in r[2]
                                     for r in results)]
            shutil.rmtree(dest)


# ----------------------------------------------------------------------------- the command

def listing(dest):
    """The exercises in order, with where the copy at dest stands on each."""
    lines = [f"{'':>3} {'exercise':<22} {'min':>4}  what to write"]
    for i, ex in enumerate(EXERCISES, 1):
        status = ""
        if is_copy(dest):
            states = set(function_states(ex, dest).values())
            status = ("  [to write]" if "blank" in states else
                      "  [written]" if states == {"edited"} else
                      "  [started]" if "edited" in states else "")
        lines.append(f"{i:>3} {ex.id:<22} {ex.minutes:>4}  {ex.file}: {', '.join(ex.functions)}"
                     f"{status}")
    total = sum(ex.minutes for ex in EXERCISES)
    lines.append(f"{len(EXERCISES)} exercises, about {total / 60:.0f} hours. Your copy: {dest}"
                 + ("" if is_copy(dest) else " (not made yet)"))
    lines.append("start one: python exercises.py --start=ID; grade it: python exercises.py "
                 "--check=ID (docs/exercises.md)")
    return lines


def main():
    cli.check(globals(), [("timeout", timeout >= 1, "at least 1 second")])
    if bool(start) + bool(check) + bool(verify) > 1:
        raise ValueError("--start, --check and --verify go one at a time")
    dest = copy_folder()
    if dest.resolve() == ROOT or ROOT in dest.resolve().parents:
        raise ValueError(f"--folder={dest}: inside the project; the copy must live outside it")
    if verify:
        todo = EXERCISES if verify == "all" else [lookup(x) for x in verify.split(",")]
        bad = 0
        for what, problems in verify_exercises(todo, timeout):
            bad += bool(problems)
            ok = "every graded test passes" if what == "untouched" else "the grader is real"
            print(f"{what}: " + ("; ".join(problems) if problems else ok), flush=True)
        if bad:
            raise SystemExit(1)
        return
    if start:
        ex = lookup(start)
        names = start_exercise(ex, dest, force)
        n = EXERCISES.index(ex) + 1
        print(f"exercise {n} ({ex.id}): {ex.title}, about {ex.minutes} minutes")
        print(f"  {'blanked' if names else 'already blank'}: {ex.file}: {', '.join(ex.functions)}")
        print(f"  write them in {dest / ex.file} (each keeps its docstring)")
        print(f"  hint: {ex.hint}")
        print(f"  graded against {ex.reference} by: {', '.join(ex.tests)}")
        print(f"  then: python exercises.py --check={ex.id}"
              + (f" --folder={folder}" if folder else ""))
        return
    if check:
        todo = [lookup(x) for x in check.split(",")]
        if not is_copy(dest):
            raise ValueError(f"{dest} is not a copy made by exercises.py; start with "
                             f"python exercises.py --start={todo[0].id}")
        verdicts = grade(todo, dest, timeout)
        for _, _, lines in verdicts:
            print("\n".join(lines))
        if not all(passed for _, passed, _ in verdicts):
            raise SystemExit(1)
        return
    print("\n".join(listing(dest)))


if __name__ == "__main__":
    cli.run(main, globals())
