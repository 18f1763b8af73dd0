"""Backpropagation from scratch, before handing over to JAX (numpy + stdlib only).

engine.py   Value: a scalar with a gradient, and backward() (the chain rule)
nn.py       Module, Neuron, Layer, MLP out of Values, and SGD
tensor.py   Tensor: the same idea on numpy arrays (broadcasting, matmul, softmax,
            cross_entropy, layer_norm, embedding)
optim.py    AdamW for Tensors
gradcheck.py both engines against jax.grad in float64 (the only module using JAX)
demo.py     an MLP learns two half moons:  python -m jaxgpt.micrograd.demo
bigram.py   a bigram model of tiny shakespeare, on jaxgpt's own corpus finder,
            vocabulary and batches: python -m jaxgpt.micrograd.bigram
"""

from jaxgpt.micrograd.engine import Value, no_grad
from jaxgpt.micrograd.nn import MLP, SGD, Layer, Module, Neuron
from jaxgpt.micrograd.optim import AdamW
from jaxgpt.micrograd.tensor import Tensor

__all__ = [
    "MLP",
    "SGD",
    "AdamW",
    "Layer",
    "Module",
    "Neuron",
    "Tensor",
    "Value",
    "no_grad",
]
