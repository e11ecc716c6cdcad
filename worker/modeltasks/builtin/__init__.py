"""The tasks modelq ships: inference (generate, loglikelihood), lora (add, save) and train."""
