"""EMCL as an inference module (docs/reference.md, 'EMCL as an inference module'): CLIP2Video, our
checkpoints or any embeddings, with/without EMCL."""
