"""Training: losses, advantages, configs and checkpoints shared by the SFT and RL recipes (DESIGN §5).

Import the pieces from their modules (`npr.train.losses`, `npr.train.advantages`, …); this package file
stays empty so that `import npr.train` costs nothing.
"""
