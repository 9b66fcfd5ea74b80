"""AlignFedRec on Flower: a ServerApp and a ClientApp that call the simulator's round functions.

`client_app.py` (a SuperNode's clients), `server_app.py` (aggregation and communities),
`messages.py` (the records they exchange, validated), `settings.py` (the Hydra config of a run),
`simulate.py` (Flower's simulation runtime). The README's "Flower" section shows the three ways to run it.
"""
