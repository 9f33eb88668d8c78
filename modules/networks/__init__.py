"""LoRA and textual inversion: the files in their folders, reading and merging LoRAs (kohya, PEFT and
LyCORIS layouts), embeddings, the extra-networks panel's cards, and resolving a prompt's tags. The public
names of the modules are gathered here (`from modules import networks`; `networks.ExtraNetworks`). Imports
the core, the model store and the prompt language only; torch is imported where tensors are made."""
from __future__ import annotations

from modules.networks.hashes import autov3, sha256_file  # noqa: F401
from modules.networks.loras import LORA_EXTENSIONS, LoraInfo, LoraRegistry  # noqa: F401
from modules.networks.lora_files import LoraModule, LoraWeights, LoraFileError, load_lora  # noqa: F401
from modules.networks.lycoris import LycoModule  # noqa: F401
from modules.networks.merge import ldm_unet_module_names, AppliedLora, applied_loras  # noqa: F401
from modules.networks.embeddings import EMBEDDING_EXTENSIONS, Embedding, EmbeddingError, load_embedding, EmbeddingDatabase  # noqa: F401
from modules.networks.cards import PREVIEW_SUFFIXES, Card, lora_context_width, embedding_file_widths, cards_for  # noqa: F401
from modules.networks.extra_networks import ResolvedNetworks, text_encoder_widths, ExtraNetworks, for_folders  # noqa: F401
