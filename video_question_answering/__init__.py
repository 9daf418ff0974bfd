"""EMCL-QA (SPEC §5): video question answering on MSRVTT-QA with EMCL as an auxiliary contrastive loss."""
