"""Test-wide settings: the models here are tiny, so one intra-op thread is fastest and keeps
timings stable when other processes share the machine's cores."""

import torch

torch.set_num_threads(1)
