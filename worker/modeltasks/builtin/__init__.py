"""The tasks modelq ships: generate, scoring (loglikelihood, loglikelihood_rolling), lora (add, save)
and train; batching and encoding (HFLM's tokenization) are what generate and scoring share."""
