"""LoRA and textual inversion: the files in their folders, reading and merging LoRAs (kohya, PEFT and
LyCORIS layouts), embeddings, the extra-networks panel's cards, and resolving a prompt's tags. The public
names of the modules are gathered here (`from modules import networks`; `networks.ExtraNetworks`). Imports
the core, the model store and the prompt language only; torch is imported where tensors are made."""
from __future__ import annotations

from modules.networks.cards import (  # noqa: F401
    PREVIEW_SUFFIXES,
    Card,
    cards_for,
    embedding_file_widths,
    lora_context_width,
)
from modules.networks.embeddings import (  # noqa: F401
    EMBEDDING_EXTENSIONS,
    Embedding,
    EmbeddingDatabase,
    EmbeddingError,
    load_embedding,
)
from modules.networks.extra_networks import (  # noqa: F401
    ExtraNetworks,
    ResolvedNetworks,
    for_folders,
    text_encoder_widths,
)
from modules.networks.hashes import autov3, sha256_file  # noqa: F401
from modules.networks.lora_files import (  # noqa: F401
    LoraFileError,
    LoraModule,
    LoraWeights,
    load_lora,
)
from modules.networks.loras import LORA_EXTENSIONS, LoraInfo, LoraRegistry  # noqa: F401
from modules.networks.lycoris import LycoModule  # noqa: F401
from modules.networks.merge import AppliedLora, applied_loras, ldm_unet_module_names  # noqa: F401
