# 001 "Getting Started", Data transfer. Fixes: none.
from persia.ctx import init_backend
backend = init_backend(init_output=True, wait_server_ready=True)
backend.send_data(persia_batch_data) # register sparse data and transfer remain part to trainer service
