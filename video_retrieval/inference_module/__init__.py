"""EMCL as an inference module (SPEC §4): CLIP2Video, our checkpoints or any embeddings, with/without EMCL."""
