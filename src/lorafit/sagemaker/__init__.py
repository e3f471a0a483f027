"""Run lorafit as an Amazon SageMaker training job.

``launcher`` (runs on the user's machine, boto3): uploads data, model and config to S3, creates the
training job, follows it, fetches its model.tar.gz. ``entry`` (runs inside the job's container):
maps SageMaker's hyperparameters, channels and folders onto a lorafit config and trains.
boto3 is imported only by the launcher, so the container never needs it.
"""
