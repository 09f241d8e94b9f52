"""What is concluded: learning curves, statistics across seeds, kernel pictures."""
