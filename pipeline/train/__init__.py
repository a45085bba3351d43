"""The training job: worker loop, optimizer and schedule, checkpoints, MLflow tracking, evaluation."""
