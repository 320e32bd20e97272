"""Pruning by variational dropout: sparse VD and SBP layers, the fine-tune pipeline, the shrink step."""
