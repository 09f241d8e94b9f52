"""What is done to the models: stimuli, STDP pre-training, BP fine-tuning, the study."""
