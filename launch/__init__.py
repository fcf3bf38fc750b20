"""The training job: launch/train.py (run as a file by python, torchrun, deepspeed or mpirun), its engines,
model, data and launchers. Imports the library (apollo_dist), never tools/."""
