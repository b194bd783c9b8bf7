"""The pipeline's stages (prepare, sample, score, advantage, update, evaluate, report) and their shared code."""
