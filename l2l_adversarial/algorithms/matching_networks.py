"""Matching Networks (Vinyals et al., 2016) with Full Contextual Embeddings: the paper's
similarity-based baseline.

For a support set ``S = {(x_i, y_i)}`` and a query ``x``, the network predicts
``p(y | x, S) = sum_i a(x, x_i) y_i`` (``y_i`` one-hot), where the attention
``a(x, x_i) = softmax_i cos(f(x, S), g(x_i, S))`` is a softmax over the support set of cosine
similarities. ``f'`` is the embedding network (by default the feature extractor of
:class:`~l2l_adversarial.models.CNN4`, the same 4-block CNN as the other methods). With
Full Contextual Embeddings (``fce=True``, the version the paper compares with):

* support: ``g(x_i, S) = f'(x_i) + h_fw_i + h_bw_i``, a bidirectional LSTM over the support
  embeddings in the order given, with a skip connection;
* query: an attention LSTM run for ``K = processing_steps`` steps, starting from
  ``h_0 = f'(x)`` and ``c_0 = 0``::

      a_i     = softmax_i(h_{k-1} . g(x_i, S))          (read attention, dot product)
      r_{k-1} = sum_i a_i g(x_i, S)
      h^_k, c_k = LSTM(f'(x), [h_{k-1}, r_{k-1}], c_{k-1})
      h_k     = h^_k + f'(x)                           and f(x, S) = h_K.

  The LSTM's state input is the concatenation ``[h_{k-1}, r_{k-1}]``; since gates are linear
  in input and state, this is ``nn.LSTMCell(2D, D)`` fed ``[f'(x), r_{k-1}]`` with state
  ``(h_{k-1}, c_{k-1})``. Vinyals et al. do not state K; the default here is 5.

With ``fce=False`` the attention is the plain cosine kernel on ``f'`` embeddings. The forward
pass returns log-probabilities ``log p(y | x, S)``: they serve as logits for the attacks
(rows already normalised, so ``cross_entropy(log p) == nll_loss(log p)``). Support and query
images are embedded in two forward passes, so a BatchNorm layer with batch statistics (as in
``CNN4``) normalises each set with its own statistics, as MAML's inner and outer passes do.

The implementation the paper used (gitabcworld/MatchingNetworks) differs from the equations
above: it runs one bidirectional LSTM (no skip connection) over the support set with the
query appended, has no attention LSTM, normalises only the support embedding in the
similarity, and applies ``cross_entropy`` to probabilities. This module follows Vinyals et
al.'s equations.

Meta-testing with adversarial samples. A Matching Network "adapts" by conditioning on its
support set; it has no parameters specific to a task. The paper's six scenarios
("support - query": Clean/40%/Adversarial - Clean/Adversarial) map as follows:

* adversarial support samples: ``attack(net.support_model(support, labels), support,
  labels)``. Each support image is attacked as if it were a query classified by the network
  conditioned on the *clean* support set. This is the closest analogue of MAML's support
  attack (FGSM on the support samples against the model before it learns from them) that
  needs no query labels: the perturbation pushes the image's embedding away from its own
  class in the clean context, so the perturbed image is a misleading exemplar once it is
  part of the support set;
* 40%: keep the attacked copies of ``per_class_prefix(labels, 0.4)`` of the support samples
  (attack the whole set, keep those rows: ``l2l_adversarial.transforms.perturb``);
* adversarial queries: ``attack(net.query_model(support, labels), queries, query_labels)``
  against either the clean support set's classifier (the model every attack targets before
  adaptation, ``net.support_model``) or the classifier that scores them, conditioned on the
  support set in use (the analogue of attacking MAML's adapted model).

As a :class:`~l2l_adversarial.evaluation.FewShotLearner`: ``initial_model`` is
``net.support_model`` and ``adapt(support, labels)`` is ``[net.query_model(support, labels)]``.

Example:
    >>> import torch
    >>> from l2l_adversarial.attacks import FGSM
    >>> net = MatchingNetwork(ways=5, in_channels=1, image_size=16, hidden=8)
    >>> sx, sy = torch.rand(5, 1, 16, 16), torch.arange(5)
    >>> qx, qy = torch.rand(10, 1, 16, 16), torch.arange(5).repeat(2)
    >>> net(sx, sy, qx).shape                      # log-probabilities
    torch.Size([10, 5])
    >>> net.meta_loss(sx, sy, qx, qy).backward()   # episodic training
    >>> fgsm = FGSM(eps=2 / 255)
    >>> adversarial_support = fgsm(net.support_model(sx, sy), sx, sy)
    >>> adversarial_queries = fgsm(net.query_model(adversarial_support, sy), qx, qy)
    >>> net(adversarial_support, sy, adversarial_queries).shape   # "Adversarial-Adversarial"
    torch.Size([10, 5])
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from l2l_adversarial.functional import accuracy, stateless
from l2l_adversarial.models import CNN4
from l2l_adversarial.validation import check_inputs_fit, check_task

__all__ = ["MatchingNetwork"]


def _check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _infer_embedding_dim(embedding: nn.Module, in_channels: int, image_size: int) -> int:
    """Width of ``embedding``'s output for two ``(in_channels, image_size, image_size)`` images."""
    parameter = next(embedding.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    probe = torch.zeros(2, in_channels, image_size, image_size, device=device)
    try:
        with torch.no_grad():
            features = stateless(embedding)(probe)
    except Exception as error:
        raise ValueError(
            f"could not infer the embedding width by running the embedding on a "
            f"(2, {in_channels}, {image_size}, {image_size}) input ({error}); pass "
            "embedding_dim=<width of its flat output> or matching in_channels/image_size"
        ) from error
    if features.dim() != 2:
        raise ValueError(
            f"the embedding must return flat (N, D) features, got shape {tuple(features.shape)}; "
            "end it with nn.Flatten()"
        )
    return int(features.shape[1])


class MatchingNetwork(nn.Module):
    """Matching Networks for ``ways``-way episodes, with or without Full Contextual Embeddings.

    Args:
        embedding: the embedding network ``f'`` mapping ``(N, ...)`` inputs to flat ``(N, D)``
            features; default ``CNN4(ways, in_channels, hidden, image_size).features``.
        ways: number of classes per episode (labels in ``[0, ways)``; each class needs at
            least one support sample).
        in_channels, image_size: image shape; used to build the default embedding and to
            infer ``D`` for FCE by running ``embedding`` once.
        hidden: filters per convolution of the default embedding (the paper: 32).
        fce: use Full Contextual Embeddings (bidirectional support LSTM and attention LSTM).
        lstm_layers: layers of the bidirectional support LSTM (FCE only).
        processing_steps: K, steps of the query attention LSTM (FCE only).
        embedding_dim: ``D``, the width of ``embedding``'s output; inferred when omitted.

    Example:
        >>> net = MatchingNetwork(ways=5, in_channels=3, image_size=84)  # the paper's setting
        >>> sx, sy, qx = torch.rand(5, 3, 84, 84), torch.arange(5), torch.rand(3, 3, 84, 84)
        >>> net(sx, sy, qx).exp().sum(dim=1).allclose(torch.ones(3))  # probabilities sum to one
        True
    """

    def __init__(
        self,
        embedding: nn.Module | None = None,
        ways: int = 5,
        in_channels: int = 3,
        image_size: int = 84,
        hidden: int = 32,
        fce: bool = True,
        lstm_layers: int = 1,
        processing_steps: int = 5,
        *,
        embedding_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.ways = _check_positive_int("ways", ways, minimum=2)
        self.lstm_layers = _check_positive_int("lstm_layers", lstm_layers)
        self.processing_steps = _check_positive_int("processing_steps", processing_steps)
        if embedding is None:
            embedding = CNN4(ways, in_channels, hidden, image_size).features
        elif not isinstance(embedding, nn.Module):
            raise TypeError(
                f"embedding must be a torch.nn.Module (or None for CNN4's features), "
                f"got {type(embedding).__name__}"
            )
        self.embedding = embedding
        self.fce = bool(fce)
        self.embedding_dim: int | None = None
        if self.fce:
            if embedding_dim is None:
                embedding_dim = _infer_embedding_dim(embedding, in_channels, image_size)
            width = _check_positive_int("embedding_dim", embedding_dim)
            self.embedding_dim = width
            self.support_lstm = nn.LSTM(width, width, num_layers=lstm_layers, bidirectional=True)
            self.query_lstm = nn.LSTMCell(2 * width, width)

    def _embed(self, name: str, inputs: Tensor) -> Tensor:
        features = self.embedding(inputs)
        if features.dim() != 2:
            raise ValueError(
                f"the embedding of {name} has shape {tuple(features.shape)}; it must return "
                "flat (N, D) features: end the embedding with nn.Flatten()"
            )
        if self.embedding_dim is not None and features.shape[1] != self.embedding_dim:
            raise ValueError(
                f"the embedding of {name} has width {features.shape[1]} but the FCE LSTMs were "
                f"built for embedding_dim={self.embedding_dim}; check in_channels/image_size"
            )
        return features

    def support_embeddings(self, support_inputs: Tensor) -> Tensor:
        """``g(x_i, S)`` for every support sample, shape ``(n_support, D)``."""
        features = self._embed("support_inputs", support_inputs)
        if not self.fce:
            return features
        outputs, _ = self.support_lstm(features)  # unbatched: (n_support, 2D)
        forward, backward = outputs.chunk(2, dim=1)
        return features + forward + backward

    def query_embeddings(self, query_inputs: Tensor, support: Tensor) -> Tensor:
        """``f(x, S)`` for every query given the support embeddings, shape ``(n_query, D)``."""
        features = self._embed("query_inputs", query_inputs)
        if not self.fce:
            return features
        state = features
        cell = torch.zeros_like(features)
        for _ in range(self.processing_steps):
            read = torch.softmax(state @ support.T, dim=1) @ support
            output, cell = self.query_lstm(torch.cat([features, read], dim=1), (state, cell))
            state = output + features
        return state

    def _validate(
        self, support_inputs: Tensor, support_labels: Tensor, query_inputs: Tensor
    ) -> None:
        if not isinstance(query_inputs, Tensor) or query_inputs.dim() < 1:
            raise ValueError(
                "query_inputs must be a (n_query, ...) tensor, got "
                f"{getattr(query_inputs, 'shape', type(query_inputs).__name__)}"
            )
        placeholder_labels = torch.zeros(
            query_inputs.shape[0], dtype=torch.long, device=query_inputs.device
        )
        check_task(support_inputs, support_labels, query_inputs, placeholder_labels, self.ways)
        check_inputs_fit(self.embedding, support_inputs, "support_inputs (the embedding)")
        check_inputs_fit(self.embedding, query_inputs, "query_inputs (the embedding)")
        missing = sorted(set(range(self.ways)) - set(support_labels.tolist()))
        if missing:
            raise ValueError(
                f"support_labels has no sample of class(es) {missing}: a Matching Network "
                f"predicts only classes it has support samples of; give every class in "
                f"[0, {self.ways}) at least one support sample"
            )

    def attention(
        self, support_inputs: Tensor, support_labels: Tensor, query_inputs: Tensor
    ) -> Tensor:
        """``a(x, x_i)``: softmax over the support set of cosine similarities, ``(n_query, n_support)``.

        Rows sum to one.
        """
        self._validate(support_inputs, support_labels, query_inputs)
        support = self.support_embeddings(support_inputs)
        queries = self.query_embeddings(query_inputs, support)
        similarity = (
            nn.functional.normalize(queries, dim=1) @ nn.functional.normalize(support, dim=1).T
        )
        return torch.softmax(similarity, dim=1)

    def forward(
        self, support_inputs: Tensor, support_labels: Tensor, query_inputs: Tensor
    ) -> Tensor:
        """Log-probabilities ``log sum_i a(x, x_i) y_i`` of the queries, ``(n_query, ways)``."""
        weights = self.attention(support_inputs, support_labels, query_inputs)
        one_hot = nn.functional.one_hot(_long(support_labels), self.ways).to(weights.dtype)
        # Cosine similarities lie in [-1, 1], so every class present in the support set has
        # probability >= exp(-2) / n_support > 0: the logarithm is finite.
        return torch.log(weights @ one_hot)

    def loss_and_accuracy(
        self,
        support_inputs: Tensor,
        support_labels: Tensor,
        query_inputs: Tensor,
        query_labels: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Episodic training loss of one task (query negative log-likelihood, differentiable)
        and the query accuracy (detached)."""
        check_task(support_inputs, support_labels, query_inputs, query_labels, self.ways)
        query_labels = _long(query_labels)  # class indices of any integer dtype
        log_probabilities = self(support_inputs, support_labels, query_inputs)
        loss = nn.functional.nll_loss(log_probabilities, query_labels)
        return loss, accuracy(log_probabilities.detach(), query_labels)

    def meta_loss(self, *task: Tensor) -> Tensor:
        """Episodic training loss of one task (the arguments of :meth:`loss_and_accuracy`):
        the query negative log-likelihood."""
        return self.loss_and_accuracy(*task)[0]

    def query_model(
        self, support_inputs: Tensor, support_labels: Tensor
    ) -> Callable[[Tensor], Tensor]:
        """The classifier of queries conditioned on a support set: ``x -> log p(y | x, S)``.

        For the attacks: it reads detached parameters and copies of the buffers, so attacking
        it changes nothing in the network. ``attack(net.query_model(sx, sy), qx, qy)``.
        """
        return stateless(self, leading_args=(support_inputs, support_labels))

    def support_model(
        self, support_inputs: Tensor, support_labels: Tensor
    ) -> Callable[[Tensor], Tensor]:
        """The classifier a support-set attack targets: the clean support set's query model.

        Support images are attacked as queries classified against the clean support set
        (see the module docstring): ``attack(net.support_model(sx, sy), sx, sy)``.
        """
        return self.query_model(support_inputs, support_labels)


def _long(labels: Tensor) -> Tensor:
    """Class indices of any integer dtype as ``torch.long`` (checked by ``check_task``)."""
    return labels if labels.dtype == torch.long else labels.long()
