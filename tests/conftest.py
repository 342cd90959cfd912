"""Suite-wide settings: tiny models run fastest on one thread (and the CI box has only two cores)."""

import torch

torch.set_num_threads(1)
