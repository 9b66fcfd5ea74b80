"""The campaign as a Hydra sweeper, so any Hydra launcher (joblib, submitit/SLURM, Ray) runs its jobs."""
