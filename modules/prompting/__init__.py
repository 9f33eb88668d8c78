"""The A1111 prompt language: the parser (emphasis, editing, alternation, AND, extra-network tags), the CLIP
tokenizer, conditioning tensors from prompts, and styles. Imports the core only."""
