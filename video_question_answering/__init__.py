"""EMCL-QA (docs/reference.md, 'EMCL-QA'): video question answering on MSRVTT-QA with EMCL as an
auxiliary contrastive loss."""
