import os

# Quiet TensorFlow's C++ logging and keep it off any GPU in every test process and subprocess.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
