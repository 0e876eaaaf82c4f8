"""micrograd.py: automatic differentiation from scratch, twice.

What you will learn
  Part 1, Value: a scalar that remembers how it was made. Each op records its inputs and a small
  backward function; backward() orders the graph inputs-first, then walks it in reverse applying
  the chain rule. That is enough to train a neural net (Neuron, Layer, MLP below).
  Part 2, Tensor: the same on numpy arrays (broadcasting, batched matmul, softmax, cross-entropy,
  layer norm...): all a transformer block needs (block.py runs one on it), plus SGD and AdamW.

Run it
  python micrograd.py                       # an MLP learns two moons, then draws its boundary
  python micrograd.py --steps=40 --seed=7   # any constant below can be overridden like this

Every value and gradient here is checked against torch autograd in test_all.py.
"""
import cli  # first: a Ctrl-C while torch loads is one line, and --help needs no torch
cli.start(__name__, __file__)

import math
import numbers
import random
import time

import numpy as np


# demo hyperparameters (python micrograd.py --name=value)
seed = 1337
n_points = 100   # two-moons training points
noise = 0.1      # std of the gaussian noise on the moons
hidden = 16      # neurons in each of the two hidden layers
steps = 100      # full-batch SGD steps
lr = 1.0         # learning rate at step 0, decayed linearly to 10% of it
alpha = 1e-4     # L2 regularization strength

# ----------------------------------------------------------------------------- Part 1: the scalar engine
def _value(x, op):
    """A plain number as a Value; anything else is a clear error at the op."""
    if isinstance(x, numbers.Real):
        return Value(float(x))
    raise TypeError(f"Value {op} {x!r}: expected a number or a Value, got {type(x).__name__}")

class Value:
    """One scalar in a computation graph: its data, its gradient, and how to pass gradients on. Lean: __slots__,
    and each op's backward is a plain function of (out, g), not a closure per node (fewer objects, no cycles)."""
    __slots__ = ("data", "grad", "_prev", "_backward")
    __array_ufunc__ = None  # numpy_number * value calls Value.__rmul__, not numpy's object loop

    def __init__(self, data, _prev=(), _backward=None):
        if type(data) is not float:  # exact type check first: the common case costs nothing
            if not isinstance(data, numbers.Real):
                raise TypeError(f"Value({data!r}): expected a number, got {type(data).__name__}")
            data = float(data)
        self.data, self.grad = data, 0.0
        self._prev = _prev          # the Values this one was computed from
        self._backward = _backward  # _backward(self, g): add g * d(self)/d(input) to each input

    # each op's backward, right below it, passes g (the result's gradient) times the local derivative to each input
    def __add__(self, other):
        other = other if isinstance(other, Value) else _value(other, "+")
        return Value(self.data + other.data, (self, other), Value._add_backward)
    def _add_backward(out, g):
        a, b = out._prev
        a.grad += g
        b.grad += g

    def __sub__(self, other):
        other = other if isinstance(other, Value) else _value(other, "-")
        return Value(self.data - other.data, (self, other), Value._sub_backward)
    def _sub_backward(out, g):
        a, b = out._prev
        a.grad += g
        b.grad -= g

    def __mul__(self, other):
        other = other if isinstance(other, Value) else _value(other, "*")
        return Value(self.data * other.data, (self, other), Value._mul_backward)
    def _mul_backward(out, g):
        a, b = out._prev
        a.grad += b.data * g
        b.grad += a.data * g

    def __truediv__(self, other):
        other = other if isinstance(other, Value) else _value(other, "/")
        return Value(self.data / other.data, (self, other), Value._div_backward)
    def _div_backward(out, g):
        a, b = out._prev
        a.grad += g / b.data
        b.grad -= g * out.data / b.data  # d(a/b)/db = -a/b^2 = -out/b

    def __pow__(self, k):
        if not isinstance(k, numbers.Real):
            raise TypeError(f"Value ** {k!r}: the exponent must be a plain number")
        out = self.data ** k
        if isinstance(out, complex):
            raise ValueError(f"Value({self.data}) ** {k} is not a real number")
        def backward(out, g):  # the one op that needs a closure: it must remember k
            self.grad += k * self.data ** (k - 1) * g
        return Value(out, (self,), backward)

    def __neg__(self):
        return Value(-self.data, (self,), Value._neg_backward)
    def _neg_backward(out, g):
        out._prev[0].grad -= g

    def exp(self):
        return Value(math.exp(self.data), (self,), Value._exp_backward)
    def _exp_backward(out, g):
        out._prev[0].grad += out.data * g  # exp is its own derivative

    def log(self):
        if self.data <= 0:
            raise ValueError(f"log of Value({self.data}): needs a positive number")
        return Value(math.log(self.data), (self,), Value._log_backward)
    def _log_backward(out, g):
        out._prev[0].grad += g / out._prev[0].data

    def tanh(self):
        return Value(math.tanh(self.data), (self,), Value._tanh_backward)
    def _tanh_backward(out, g):
        out._prev[0].grad += (1 - out.data * out.data) * g

    def relu(self):
        return Value(self.data if self.data > 0 else 0.0, (self,), Value._relu_backward)
    def _relu_backward(out, g):
        if out.data > 0:
            out._prev[0].grad += g

    def sigmoid(self):
        e = math.exp(-abs(self.data))  # never exp of a large positive number: no overflow
        return Value(1 / (1 + e) if self.data >= 0 else e / (1 + e), (self,), Value._sigmoid_backward)
    def _sigmoid_backward(out, g):
        out._prev[0].grad += out.data * (1 - out.data) * g

    # a number on the left: 2 * v calls v.__rmul__(2)
    def __radd__(self, other): return self + other
    def __rmul__(self, other): return self * other
    def __rsub__(self, other): return _value(other, "-") - self
    def __rtruediv__(self, other): return _value(other, "/") / self

    @staticmethod
    def sum(values):
        """sum(values) as one node instead of a chain of len(values) additions."""
        values = tuple(v if isinstance(v, Value) else _value(v, "sum") for v in values)
        total = 0.0
        for v in values:
            total += v.data
        return Value(total, values, Value._sum_backward)
    def _sum_backward(out, g):
        for v in out._prev:
            v.grad += g

    @staticmethod
    def dot(ws, xs, bias):
        """bias + sum(w * x): a neuron's weighted sum as ONE node instead of 2n (no needless objects)."""
        xs = [x if isinstance(x, Value) else _value(x, "dot") for x in xs]  # ws: Values
        bias = bias if isinstance(bias, Value) else _value(bias, "dot")
        if len(ws) != len(xs):
            raise ValueError(f"dot: {len(ws)} weights but {len(xs)} inputs")
        total = bias.data
        for w, x in zip(ws, xs):
            total += w.data * x.data
        return Value(total, (bias, *ws, *xs), Value._dot_backward)
    def _dot_backward(out, g):
        prev, n = out._prev, len(out._prev) // 2  # prev = (bias, w_1..w_n, x_1..x_n)
        prev[0].grad += g
        for w, x in zip(prev[1:n + 1], prev[n + 1:]):
            w.grad += x.data * g
            x.grad += w.data * g

    @staticmethod
    def _topo(root):
        """Every interior node reachable from root (leaves have no backward to run), each after
        its inputs: the order backward() walks in reverse. An explicit stack, not recursion:
        100,000 ops deep works (recursion stops near 1,000). Tensor.backward walks the same way."""
        order, seen, stack = [], {root}, [(root, iter(root._prev))]
        while stack:
            v, inputs = stack[-1]
            for c in inputs:
                if c._prev and c not in seen:
                    seen.add(c)
                    stack.append((c, iter(c._prev)))
                    break
            else:
                stack.pop()
                order.append(v)
        return order if root._prev else []

    def backward(self):
        """v.grad = d(self)/d(v) for every Value v this depends on. Leaves accumulate like torch
        (zero_grad() between steps); interior nodes restart from 0, so nothing counts twice."""
        order = Value._topo(self)
        for v in order:
            v.grad = 0.0
        self.grad = 1.0
        for v in reversed(order):  # reverse: a node's grad is complete before it passes it on
            v._backward(v, v.grad)

    def __repr__(self): return f"Value(data={self.data:.6g}, grad={self.grad:.6g})"

def _size(n, where, name, meaning):
    """n if it is an integer >= 1, else a ValueError naming it: Neuron(0) has nothing to weigh."""
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{where}: {name} must be an integer >= 1 ({meaning}), got {n!r}")
    return int(n)

class Module:
    def zero_grad(self):
        for p in self.parameters():
            p.grad = 0.0

class Neuron(Module):
    def __init__(self, nin, nonlin=True):
        self.w = [Value(random.uniform(-1, 1)) for _ in range(_size(nin, "Neuron", "nin", "its inputs"))]
        self.b = Value(0.0)
        self.nonlin = nonlin  # the last layer stays linear: its output is a score, not a feature

    def __call__(self, x):
        act = Value.dot(self.w, x, self.b)
        return act.relu() if self.nonlin else act

    def parameters(self): return self.w + [self.b]

class Layer(Module):
    def __init__(self, nin, nout, nonlin=True):
        self.neurons = [Neuron(nin, nonlin) for _ in range(_size(nout, "Layer", "nout", "its neurons"))]

    def __call__(self, x):
        out = [n(x) for n in self.neurons]
        return out[0] if len(out) == 1 else out

    def parameters(self): return [p for n in self.neurons for p in n.parameters()]

class MLP(Module):
    """MLP(2, [16, 16, 1]): 2 inputs, two ReLU layers of 16, one linear output."""
    def __init__(self, nin, nouts):
        if not isinstance(nouts, (list, tuple)) or not nouts:
            raise ValueError("MLP: nouts must list at least one layer size, e.g. [16, 16, 1]")
        sizes = [_size(nin, "MLP", "nin", "its inputs")]
        sizes += [_size(n, "MLP", f"nouts[{i}]", "a layer's size") for i, n in enumerate(nouts)]
        self.layers = [Layer(sizes[i], sizes[i + 1], nonlin=i < len(nouts) - 1) for i in range(len(nouts))]

    def __call__(self, x):
        x = [xi if isinstance(xi, Value) else _value(xi, "MLP input") for xi in x]
        for layer in self.layers:
            x = layer(x)
        return x

    def parameters(self): return [p for layer in self.layers for p in layer.parameters()]

# ----------------------------------------------------------------------------- Part 2: the tensor engine
# Same graph and walk (Value._topo), but an op's backward(g) returns one gradient per input; Tensor.backward adds each in
# (summed over broadcast axes). Ops are few and heavy: closures holding forward results (e, s, xhat) cost nothing.
def _axis(a, shape, op):
    """One axis as a non-negative int, or an error naming the axis and the shape."""
    if not isinstance(a, numbers.Integral) or not -len(shape) <= a < len(shape):
        raise ValueError(f"{op}: axis {a!r} is out of range for shape {shape}")
    return int(a) % len(shape)

def _axes(axis, shape, op):
    """None (all axes), an int or a tuple of ints, as a tuple of non-negative ints."""
    if axis is None:
        return tuple(range(len(shape)))
    axes = tuple(_axis(a, shape, op) for a in (axis if isinstance(axis, (tuple, list)) else (axis,)))
    if len(set(axes)) != len(axes):
        raise ValueError(f"{op}: axis {axis!r} repeats an axis")
    return axes

def _lift(x, op, dtype):
    """An operand as a Tensor. Numbers and numpy arrays become constants (no gradient)."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, numbers.Real) or (isinstance(x, np.ndarray) and x.dtype.kind in "biuf"):
        return Tensor(np.asarray(x, dtype if isinstance(x, numbers.Real) else None), requires_grad=False)
    raise TypeError(f"{op}: expected a number, a numpy array or a Tensor, got {type(x).__name__} {x!r:.60}")

def _binary(op, a, b):
    """Both operands of an elementwise op, checked here so a bad shape fails at the op."""
    b = _lift(b, op, a.data.dtype)
    try:
        np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(f"{op}: shapes {a.shape} and {b.shape} do not broadcast") from None
    return a, b

def _node(data, prev, backward):
    """The Tensor an op computed from the Tensors in prev (skips __init__'s input checks)."""
    t = Tensor.__new__(Tensor)
    t.data, t.grad, t.requires_grad = np.asarray(data), None, any(p.requires_grad for p in prev)
    t._prev, t._backward = prev, backward
    return t

class Tensor:
    """An n-d float32/float64 numpy array in a computation graph (wrapped, not copied); grad: same shape after
    backward() (None before). Constants (requires_grad=False), and results of only constants, get no gradient."""
    __slots__ = ("data", "grad", "requires_grad", "_prev", "_backward")
    __array_ufunc__ = None  # so numpy_array + tensor calls Tensor.__radd__, not an element loop

    def __init__(self, data, dtype=None, requires_grad=True):
        if dtype is not None and np.dtype(dtype) not in (np.float32, np.float64):
            raise ValueError(f"Tensor: dtype must be float32 or float64, got {np.dtype(dtype)}")
        try:
            arr = np.asarray(data.data if isinstance(data, Tensor) else data, dtype=dtype)
            assert arr.dtype.kind in "biuf"
        except (AssertionError, TypeError, ValueError):
            raise TypeError(f"Tensor({data!r:.60}): not an array of numbers") from None
        self.data = arr if arr.dtype in (np.float32, np.float64) else arr.astype(np.float64)
        self.grad, self.requires_grad, self._prev, self._backward = None, requires_grad, (), None

    shape = property(lambda self: self.data.shape)
    ndim = property(lambda self: self.data.ndim)
    dtype = property(lambda self: self.data.dtype)
    def item(self): return self.data.item()
    def __repr__(self): return f"Tensor(shape={self.shape}, dtype={self.dtype}, data={self.data!r:.80})"

    def _acc(self, g):
        """Add an incoming gradient, summed over broadcast axes (a value used twice gets both)."""
        if not self.requires_grad:
            return
        g = g.astype(self.data.dtype, copy=False)
        if g.shape != self.shape:
            g = g.sum(axis=tuple(range(g.ndim - self.ndim)))
            g = g.sum(axis=tuple(i for i, n in enumerate(self.shape) if n == 1), keepdims=True)
        if self.grad is not None:
            self.grad = self.grad + g
        else:  # a leaf gets its own writable array (grad clipping edits it); interior grads are only read
            self.grad = g if self._prev else np.array(g)

    def backward(self, grad=None):
        """d(self)/d(x) into x.grad for every Tensor x this one depends on (leaves accumulate)."""
        if grad is None and self.data.size != 1:
            raise ValueError(f"backward() on shape {self.shape} needs grad= of that shape")
        grad = np.ones_like(self.data) if grad is None else np.asarray(grad, self.data.dtype)
        if grad.shape != self.shape:
            raise ValueError(f"backward(): grad shape {grad.shape} != tensor shape {self.shape}")
        order = Value._topo(self)
        for v in order:
            v.grad = None
        self._acc(grad)
        for v in reversed(order):
            if v.grad is not None:
                for x, gx in zip(v._prev, v._backward(v.grad)):
                    if gx is not None:
                        x._acc(gx)

    # elementwise arithmetic, broadcasting like numpy
    def __add__(self, other):
        a, b = _binary("+", self, other)
        return _node(a.data + b.data, (a, b), lambda g: (g, g))
    def __sub__(self, other):
        a, b = _binary("-", self, other)
        return _node(a.data - b.data, (a, b), lambda g: (g, -g))
    def __mul__(self, other):
        a, b = _binary("*", self, other)
        return _node(a.data * b.data, (a, b), lambda g: (g * b.data, g * a.data))
    def __truediv__(self, other):
        a, b = _binary("/", self, other)
        return _node(a.data / b.data, (a, b), lambda g: (g / b.data, -g * a.data / (b.data * b.data)))
    def __pow__(self, k):
        if not isinstance(k, numbers.Real):
            raise TypeError(f"Tensor ** {k!r:.60}: the exponent must be a plain number")
        return _node(self.data ** k, (self,), lambda g: (g * k * self.data ** (k - 1),))
    def __neg__(self): return _node(-self.data, (self,), lambda g: (-g,))
    __radd__ = __add__
    __rmul__ = __mul__
    def __rsub__(self, other): return _lift(other, "-", self.data.dtype) - self
    def __rtruediv__(self, other): return _lift(other, "/", self.data.dtype) / self

    def __matmul__(self, other):
        a, b = self, _lift(other, "@", self.data.dtype)
        try:
            data = a.data @ b.data
        except ValueError:
            raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not match") from None
        if a.ndim == 1 or b.ndim == 1:  # a vector: as a (1, K) row or a (K, 1) column, then drop it
            a2 = a.reshape(1, -1) if a.ndim == 1 else a
            return (a2 @ (b.reshape(-1, 1) if b.ndim == 1 else b)).reshape(data.shape)
        def backward(g):  # d(a @ b): g @ b^T for a, a^T @ g for b (skipped for constants)
            ga = g @ np.swapaxes(b.data, -1, -2) if a.requires_grad else None
            if not b.requires_grad:
                return ga, None
            if b.ndim == 2:  # (B, T, C) @ (C, D): fold B*T into rows, one big matmul
                return ga, a.data.reshape(-1, a.shape[-1]).T @ g.reshape(-1, g.shape[-1])
            return ga, np.swapaxes(a.data, -1, -2) @ g
        return _node(data, (a, b), backward)

    # reductions: backward spreads g back over the reduced axes
    def sum(self, axis=None, keepdims=False):
        axes = _axes(axis, self.shape, "sum")
        def backward(g):
            return (np.broadcast_to(g if keepdims else np.expand_dims(g, axes), self.shape),)
        return _node(self.data.sum(axis=axes, keepdims=keepdims), (self,), backward)

    def mean(self, axis=None, keepdims=False):
        n = math.prod(self.shape[a] for a in _axes(axis, self.shape, "mean"))
        return self.sum(axis, keepdims) * (1.0 / n)

    def max(self, axis=None, keepdims=False):
        axes = _axes(axis, self.shape, "max")
        m = self.data.max(axis=axes, keepdims=True)
        hit = self.data == m  # only the maxima get gradient; ties share it (like torch.amax)
        share = hit / hit.sum(axis=axes, keepdims=True)
        def backward(g):
            return (share * (g if keepdims else np.expand_dims(g, axes)),)
        return _node(m if keepdims else m.squeeze(axes), (self,), backward)

    # shape ops move numbers around, so backward moves the gradients back
    def reshape(self, *shape):
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        try:
            data = self.data.reshape(shape)
        except (TypeError, ValueError):
            raise ValueError(f"reshape: cannot reshape {self.shape} into {shape}") from None
        return _node(data, (self,), lambda g: (g.reshape(self.shape),))

    def permute(self, *dims):
        dims = tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
        if sorted(_axis(d, self.shape, "permute") for d in dims) != list(range(self.ndim)):
            raise ValueError(f"permute: {dims} is not an ordering of the axes of shape {self.shape}")
        undo = np.argsort([d % self.ndim for d in dims])
        return _node(self.data.transpose(dims), (self,), lambda g: (g.transpose(undo),))

    def transpose(self, dim0=-2, dim1=-1):
        """Swap two axes, like torch: x.transpose(1, 2) turns (B, T, H, d) into (B, H, T, d)."""
        dims = list(range(self.ndim))
        i, j = _axis(dim0, self.shape, "transpose"), _axis(dim1, self.shape, "transpose")
        dims[i], dims[j] = j, i
        return self.permute(dims)

    def __getitem__(self, idx):
        parts = idx if isinstance(idx, tuple) else (idx,)
        basic = all(isinstance(i, (numbers.Integral, slice)) or i is None or i is Ellipsis for i in parts)
        def backward(g):
            full = np.zeros_like(self.data)
            if basic:
                full[idx] = g  # each element picked at most once
            else:
                np.add.at(full, idx, g)  # fancy indices can repeat: add up every pick
            return (full,)
        return _node(self.data[idx], (self,), backward)  # numpy's IndexError names index and size

    # elementwise functions: backward multiplies g by the derivative
    def exp(self):
        e = np.exp(self.data)
        return _node(e, (self,), lambda g: (g * e,))
    def log(self): return _node(np.log(self.data), (self,), lambda g: (g / self.data,))
    def relu(self): return _node(np.maximum(self.data, 0), (self,), lambda g: (g * (self.data > 0),))
    def sqrt(self):
        s = np.sqrt(self.data)
        return _node(s, (self,), lambda g: (g / (2 * s),))
    def tanh(self):
        t = np.tanh(self.data)
        return _node(t, (self,), lambda g: (g * (1 - t * t),))
    def sigmoid(self):
        e = np.exp(-np.abs(self.data))  # exp of a non-positive number: never overflows
        s = np.where(self.data >= 0, 1 / (1 + e), e / (1 + e))
        return _node(s, (self,), lambda g: (g * s * (1 - s),))

_erf = np.frompyfunc(math.erf, 1, 1)  # numpy has no erf: run the exact math.erf over the array

def gelu(x, approximate="none"):
    """x * P(N(0,1) < x): a smooth ReLU. approximate="tanh" is the formula GPT-2 was trained with."""
    d = x.data
    if approximate == "tanh":
        c = math.sqrt(2 / math.pi)
        t = np.tanh(c * (d + 0.044715 * d * d * d))  # d*d*d: numpy's float32 ** 3 is 100x slower
        y = 0.5 * d * (1 + t)
        dy = 0.5 * (1 + t) + 0.5 * d * (1 - t * t) * c * (1 + 3 * 0.044715 * d * d)
    elif approximate == "none":
        cdf = 0.5 * (1 + _erf(d * (1 / math.sqrt(2))).astype(d.dtype))
        y = d * cdf
        dy = cdf + d * np.exp(-0.5 * d * d) * (1 / math.sqrt(2 * math.pi))  # cdf + x * pdf
    else:
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return _node(y, (x,), lambda g: (g * dy,))

def softmax(x, axis=-1):
    """exp(x) / sum(exp(x)) along axis; the max is subtracted first so exp cannot overflow."""
    ax = _axis(axis, x.shape, "softmax")
    e = np.exp(x.data - x.data.max(axis=ax, keepdims=True))
    s = e / e.sum(axis=ax, keepdims=True)
    return _node(s, (x,), lambda g: (s * (g - (g * s).sum(axis=ax, keepdims=True)),))

def log_softmax(x, axis=-1):
    """x - log(sum(exp(x))) along axis, computed without overflow (log-sum-exp)."""
    ax = _axis(axis, x.shape, "log_softmax")
    z = x.data - x.data.max(axis=ax, keepdims=True)
    out = z - np.log(np.exp(z).sum(axis=ax, keepdims=True))
    return _node(out, (x,), lambda g: (g - np.exp(out) * g.sum(axis=ax, keepdims=True),))

def cross_entropy(logits, targets, ignore_index=-100):
    """Mean of -log(softmax(logits)[target]) for logits (..., C) and integer targets (...).
    Positions whose target is ignore_index (padding) count for nothing, as in torch."""
    t = np.asarray(targets)
    if logits.ndim == 0 or t.dtype.kind not in "iu" or t.shape != logits.shape[:-1]:
        raise ValueError(f"cross_entropy: logits {logits.shape} need integer targets of shape "
                         f"{logits.shape[:-1]}, got {t.dtype} {t.shape}")
    C, t = logits.shape[-1], t.reshape(-1).astype(np.int64)
    keep = t != ignore_index
    bad = t[keep & ((t < 0) | (t >= C))]
    if bad.size:
        raise ValueError(f"cross_entropy: target {bad[0]} is out of range for {C} classes")
    rows = np.nonzero(keep)[0]
    n = len(rows)  # 0 (everything ignored) gives nan, like torch
    logp = log_softmax(Tensor(logits.data.reshape(-1, C))).data
    def backward(g):  # d/dlogits = softmax - onehot(target) on kept rows, averaged
        d = np.exp(logp)
        d[rows, t[rows]] -= 1
        return ((d * (keep[:, None] * (g / n))).reshape(logits.shape),)
    with np.errstate(invalid="ignore"):
        return _node(-logp[rows, t[rows]].sum() / n, (logits,), backward)

def _norm_params(op, C, dtype, *params):
    """A norm's (C,) weight and bias as Tensors; a missing one is a constant (1s or 0s)."""
    out = []
    for p, default in zip(params, (1.0, 0.0)):
        if p is not None and tuple(getattr(p, "shape", ())) != (C,):
            raise ValueError(f"{op}: weight and bias need shape ({C},), got {getattr(p, 'shape', p)!r:.60}")
        out.append(Tensor(np.full(C, default, dtype), requires_grad=False) if p is None else _lift(p, op, dtype))
    return out

def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """Normalize the last axis to mean 0, variance 1; then scale by weight, shift by bias."""
    C = x.shape[-1]
    w, b = _norm_params("layer_norm", C, x.dtype, weight, bias)
    xc = x.data - x.data.mean(axis=-1, keepdims=True)
    rstd = 1 / np.sqrt((xc * xc).mean(axis=-1, keepdims=True) + eps)
    xhat = xc * rstd
    def backward(g):  # worked out by hand: one pass instead of a dozen small nodes
        gx = g * w.data
        dx = rstd * (gx - gx.mean(axis=-1, keepdims=True) - xhat * (gx * xhat).mean(axis=-1, keepdims=True))
        return dx, (g * xhat).reshape(-1, C).sum(axis=0), g.reshape(-1, C).sum(axis=0)
    return _node(xhat * w.data + b.data, (x, w, b), backward)

def rms_norm(x, weight=None, eps=1e-6):
    """Divide the last axis by its root mean square (no centering), then scale by weight."""
    C = x.shape[-1]
    (w,) = _norm_params("rms_norm", C, x.dtype, weight)
    r = 1 / np.sqrt((x.data * x.data).mean(axis=-1, keepdims=True) + eps)
    xhat = x.data * r
    def backward(g):
        gx = g * w.data
        return r * (gx - xhat * (gx * xhat).mean(axis=-1, keepdims=True)), (g * xhat).reshape(-1, C).sum(axis=0)
    return _node(xhat * w.data, (x, w), backward)

def masked_fill(x, mask, value):
    """x with value wherever the boolean mask (broadcast to x's shape) is True; no gradient there.
    Attention hides the future this way: masked_fill(att, future, -inf) before softmax."""
    mask = np.asarray(mask)
    if mask.dtype != bool or not isinstance(value, numbers.Real):
        raise TypeError(f"masked_fill: needs a boolean mask and a number, got {mask.dtype} and {value!r:.60}")
    if mask.ndim > x.ndim or any(m not in (1, n) for m, n in zip(mask.shape[::-1], x.shape[::-1])):
        raise ValueError(f"masked_fill: mask shape {mask.shape} does not broadcast to {x.shape}")
    return _node(np.where(mask, value, x.data), (x,), lambda g: (np.where(mask, 0, g),))

def dropout(x, p=0.1, training=True, rng=None):
    """Zero each element with probability p and scale the rest by 1/(1-p), keeping the mean.
    rng: a np.random.Generator or an int seed, so a run can be repeated exactly."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    if not training or p == 0:
        return x
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    keep = ((rng.random(x.shape) >= p) / (1 - p)).astype(x.dtype)
    return _node(x.data * keep, (x,), lambda g: (g * keep,))

def embedding(weight, ids):
    """Rows of weight (V, C) picked by integer ids (...) -> (..., C): each token's vector."""
    ids = np.asarray(ids)
    if weight.ndim != 2 or ids.dtype.kind not in "iu":
        raise ValueError(f"embedding: needs a (V, C) weight and integer ids, got {weight.shape} and {ids.dtype}")
    out_of_range = ids[(ids < 0) | (ids >= weight.shape[0])]
    if out_of_range.size:
        raise ValueError(f"embedding: id {out_of_range[0]} is out of range for {weight.shape[0]} rows")
    def backward(g):  # a token seen twice collects both gradients: add, don't assign
        full = np.zeros_like(weight.data)
        np.add.at(full, ids.reshape(-1), g.reshape(-1, weight.shape[1]))
        return (full,)
    return _node(weight.data[ids], (weight,), backward)

def concat(tensors, axis=0):
    """Join tensors along axis; backward hands each its slice of the gradient."""
    ts = tuple(_lift(t, "concat", None) for t in tensors)
    if not ts:
        raise ValueError("concat: needs at least one tensor")
    ax = _axis(axis, ts[0].shape, "concat")
    try:
        data = np.concatenate([t.data for t in ts], axis=ax)
    except ValueError:
        raise ValueError(f"concat: shapes {[t.shape for t in ts]} differ outside axis {axis}") from None
    cuts = np.cumsum([t.shape[ax] for t in ts])[:-1]
    return _node(data, ts, lambda g: np.split(g, cuts, axis=ax))

def split(x, sizes, axis=-1):
    """Cut x along axis like torch.split: sizes an int (pieces of that size) or a list of sizes.
    q, k, v = split(qkv, C, axis=-1) cuts (B, T, 3C) into three (B, T, C)."""
    ax = _axis(axis, x.shape, "split")
    n = x.shape[ax]
    if isinstance(sizes, numbers.Integral):
        sizes = [sizes] * (n // sizes) + [n % sizes] * (n % sizes > 0) if sizes > 0 else [sizes]
    if sum(sizes) != n or min(sizes) < 0:
        raise ValueError(f"split: sizes {sizes} do not add up to {n} (axis {axis} of {x.shape})")
    return [x[(slice(None),) * ax + (slice(int(e - s), int(e)),)] for s, e in zip(sizes, np.cumsum(sizes))]

for _f in (gelu, softmax, log_softmax, layer_norm, rms_norm, masked_fill, dropout, split):
    setattr(Tensor, _f.__name__, _f)  # x.softmax(-1) is softmax(x, -1)

# ----------------------------------------------------------------------------- Optimizers
def _check_hyper(opt, **values):
    """The ranges torch.optim checks: a negative lr would climb the loss, a negative decay grow
    the weights."""
    for name, v in values.items():
        if not isinstance(v, numbers.Real) or v < 0:
            raise ValueError(f"{opt}: {name} must be a number >= 0, got {v!r}")

class SGD:
    """p -= lr * g, g with L2 weight decay and momentum (a running sum of past steps), as torch.optim.SGD
    (dampening=0, nesterov=False). For Tensors and Values alike (anything with .data and .grad)."""
    def __init__(self, params, lr=0.01, momentum=0.0, weight_decay=0.0):
        _check_hyper("SGD", lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.params, self.lr, self.momentum, self.weight_decay = list(params), lr, momentum, weight_decay
        self.buf = [None] * len(self.params)

    def step(self):
        for i, p in enumerate(self.params):
            if p.grad is not None:
                g = p.grad + self.weight_decay * p.data
                if self.momentum:
                    g = self.buf[i] = g if self.buf[i] is None else self.momentum * self.buf[i] + g
                p.data = p.data - self.lr * g

    def zero_grad(self):
        for p in self.params:
            p.grad = None if isinstance(p, Tensor) else 0.0

class AdamW(SGD):  # shares zero_grad
    """Adam (a step size per parameter from running gradient moments); decay shrinks weights directly, not via g."""
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        _check_hyper("AdamW", lr=lr, eps=eps, weight_decay=weight_decay)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"AdamW: betas must be two numbers in [0, 1), got {betas!r}")
        self.params, self.lr, self.betas, self.eps, self.weight_decay = list(params), lr, betas, eps, weight_decay
        self.m, self.v, self.t = [0.0] * len(self.params), [0.0] * len(self.params), 0

    def step(self):
        self.t += 1
        b1, b2 = self.betas
        for i, p in enumerate(self.params):
            if p.grad is not None:
                self.m[i] = b1 * self.m[i] + (1 - b1) * p.grad           # mean of gradients
                self.v[i] = b2 * self.v[i] + (1 - b2) * p.grad * p.grad  # mean of squared gradients
                m_hat, v_hat = self.m[i] / (1 - b1 ** self.t), self.v[i] / (1 - b2 ** self.t)  # undo the 0 start
                p.data = p.data * (1 - self.lr * self.weight_decay) - self.lr * m_hat / (v_hat ** 0.5 + self.eps)

# ----------------------------------------------------------------------------- Demo: an MLP separates two moons
def make_moons(n=100, noise=0.1, seed=0):
    """Two interleaving half circles: X (n, 2) and labels y (n,) in {-1, +1}."""
    a, b = np.linspace(0, np.pi, n - n // 2), np.linspace(0, np.pi, n // 2)
    X = np.concatenate([np.stack([np.cos(a), np.sin(a)], 1), np.stack([1 - np.cos(b), 0.5 - np.sin(b)], 1)])
    y = np.concatenate([-np.ones(len(a)), np.ones(len(b))])
    return X + np.random.default_rng(seed).normal(0, noise, X.shape), y

def hinge_loss(model, X, y, alpha=1e-4):
    """Max-margin loss (score * label should reach 1) plus L2 on the weights; and the accuracy."""
    scores = [model(x) for x in X.tolist()]
    margins = [(1 - yi * s).relu() for yi, s in zip(y.tolist(), scores)]
    loss = Value.sum(margins) * (1.0 / len(margins)) + alpha * Value.sum([p * p for p in model.parameters()])
    return loss, np.mean([(s.data > 0) == (yi > 0) for yi, s in zip(y, scores)])

def graph_bytes(n_points, hidden):
    """Bytes one step of the demo allocates, estimated before building anything: a Value node
    is ~100 bytes + 8 per input (+ its grad and backward's walk). Per point, the two hidden
    layers' dot nodes hold 2 * hidden inputs each: 16 hidden^2 bytes, most of it. Then the
    model's parameters, each squared for the L2 term. test_all checks it with tracemalloc."""
    params = 2 * hidden + hidden + hidden * hidden + hidden + hidden + 1
    return n_points * (16 * hidden * hidden + 1000 * hidden + 1500) + 400 * params

def draw(model, X, y, width=64, height=22):
    """The decision boundary in the terminal: '.' where the model says +1; points o (+1), x (-1)."""
    lo, hi = X.min(0) - 0.25, X.max(0) + 0.25
    cell = (hi - lo) / (width, height)
    grid = [["." if model([lo[0] + (c + 0.5) * cell[0], hi[1] - (r + 0.5) * cell[1]]).data > 0 else " "
             for c in range(width)] for r in range(height)]
    for (px, py), label in zip(X, y):
        grid[int((hi[1] - py) / cell[1])][int((px - lo[0]) / cell[0])] = "o" if label > 0 else "x"
    print("\n".join(["+" + "-" * width + "+"] + ["|" + "".join(row) + "|" for row in grid] + ["+" + "-" * width + "+"]))

def main():
    cli.check(globals(), [  # out of range: one clear error before any work
        ("n_points", n_points >= 2, ">= 2"), ("hidden", hidden >= 1, ">= 1"),
        ("steps", steps >= 1, ">= 1"), ("seed", seed >= 0, ">= 0"),
        ("noise", 0 <= noise < math.inf, "finite and >= 0"),
        ("lr", 0 < lr < math.inf, "finite and > 0"),
        ("alpha", 0 <= alpha < math.inf, "finite and >= 0")])
    cli.fits_in_memory(graph_bytes(n_points, hidden), f"--n_points={n_points} --hidden={hidden}")
    random.seed(seed)
    X, y = make_moons(n_points, noise, seed)
    model = MLP(2, [hidden, hidden, 1])
    print(f"MLP(2, [{hidden}, {hidden}, 1]): {len(model.parameters())} parameters, {n_points} moon points")
    t0 = time.perf_counter()
    for step in range(steps):
        loss, accuracy = hinge_loss(model, X, y, alpha)
        if not math.isfinite(loss.data):  # diverged: going on would only print nan
            raise ValueError(f"the loss is {loss.data} at step {step}: training diverged;"
                             f" lower --lr={lr} or --alpha={alpha}")
        model.zero_grad()
        loss.backward()
        for p in model.parameters():
            p.data -= lr * (1 - 0.9 * step / steps) * p.grad
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step:3d}  loss {loss.data:.4f}  accuracy {accuracy:.0%}")
    loss, accuracy = hinge_loss(model, X, y, alpha)
    print(f"final loss {loss.data:.4f}, train accuracy {accuracy:.0%} ({time.perf_counter() - t0:.1f} s)")
    draw(model, X, y)

if __name__ == "__main__":
    cli.run(main, globals(), errors=(ValueError, TypeError, OSError, ImportError))
