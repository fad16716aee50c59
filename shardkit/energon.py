"""The sample type Megatron-Energon builds from a shardkit build indexed with
``shardkit index OUTPUT --format energon``.

``.nv-meta/dataset.yaml`` names this class and maps its fields to the members every sample
carries (``shardkit.index.energon_field_map``). Arrays arrive as numpy arrays decoded without
pickle; ``metadata`` is the sample's JSON record (original size, bucket, crop, captions, token
lengths of every caption field). Importing this module needs ``megatron-energon``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from megatron.energon import Sample
from megatron.energon.edataclass import edataclass


@edataclass
class ShardkitSample(Sample):
    #: ``[2*C, h, w]``: the VAE posterior's mean and std on the channel axis
    latent: np.ndarray
    #: ``[L, D]``: the valid-token text-encoder rows of the first caption field
    caption_features: np.ndarray
    #: the first caption field's text
    caption: str
    #: the sample's JSON record
    metadata: dict[str, Any]
