"""The engines of the meta-iteration: :func:`meta_step` and its companions, from the task
runtime (:mod:`l2l_adversarial.runtime`), under the name learn2learn users import.

Example:
    >>> import torch, l2l_adversarial as l2la
    >>> from l2l_adversarial import engines
    >>> adml = l2la.ADML(l2la.CNN4(ways=3, in_channels=1, hidden=4, image_size=16), lr=0.1)
    >>> tasks = [l2la.Task(torch.rand(3, 1, 16, 16), torch.arange(3),
    ...                    torch.rand(6, 1, 16, 16), torch.arange(3).repeat(2))] * 2
    >>> optimizer = torch.optim.Adam(adml.parameters(), lr=1e-3)
    >>> objective = engines.meta_step(adml, tasks, optimizer, engine="vmap")
    >>> objective.total.shape  # the mean over the meta-batch, on the device, detached
    torch.Size([])
"""

from l2l_adversarial.runtime.engine import *  # noqa: F403
from l2l_adversarial.runtime.engine import __all__  # noqa: F401
