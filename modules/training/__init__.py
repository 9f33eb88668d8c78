"""Training: LoRA, DreamBooth (as a LoRA or a full fine-tune, with prior preservation), textual inversion and
BLIP / BLIP-2 captioners, on accelerate and peft, reached through one CLI (`python -m modules.train`) that the server
starts as a child process.

- `config`: the options (kohya's flag names), their TOML form and the checks of numbers and names (torch-free);
- `dataset`: kohya's folder layout, captions, aspect buckets, the data order and the latent cache;
- `plan`: everything checked against the disk and the model before any work (torch-free);
- `models`: the base model, loaded by the model store, and captions encoded as generation encodes prompts;
- `outputs`: peft LoRA layers, and the files written (kohya LoRA with `ss_*` metadata, checkpoint, embedding);
- `engine`: the loop (deterministic per sample, exact resume, states, NaN/OOM handling, progress lines);
- `samples`: sample images and DreamBooth class images through the generation service;
- `captioner`: the captioner method (its plan, loss, evaluation runs and output; the loop is `engine`'s);
- `runs`: the server's side: starting the CLI as a child, reading its progress, stopping it, sharing the GPU.
"""
