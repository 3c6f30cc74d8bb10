"""What the example scripts share, importable by their worker processes: check tables (:mod:`.checks`), the training
frame (:mod:`.training`), a step recorder (:mod:`.recording`), the command-line frame (:mod:`.scripts`) and the
recovery kernel of Ding et al.'s grid (:mod:`.recovery`)."""
