"""What is simulated: equations, parameter sets and network builders of the study."""
