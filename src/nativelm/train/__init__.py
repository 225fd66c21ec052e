"""The `train` stage: training loop, schedules, optimizers, checkpoints, distributed launch.

`stage.run_train(model, train, seed, data_dir, outputs, logger)` runs the stage; the model file it
writes is the format of `nativelm.formats.trained_model`.
"""
