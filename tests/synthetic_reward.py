"""A synthetic reward for learning tests: the share of response characters that are '7'."""


def sevens(response, ground_truth):
    share = response.count("7") / max(1, len(response))
    return {"reward": share, "format_reward": 0.0, "answer_reward": share}


def always(response, ground_truth):
    return {"reward": 1.0, "format_reward": 1.0, "answer_reward": 1.0}


def coin(response, ground_truth):
    """Right for responses of even length: gives DPO both chosen and rejected answers."""
    right = float(len(response) % 2 == 0)
    return {"reward": right, "format_reward": 1.0, "answer_reward": right}


def seven_first(response, ground_truth):
    """Sparse: right when the response starts with '7' (~1 in 100 for a random character model,
    so most groups of 8 are all wrong and carry no gradient)."""
    right = float(response[:1] == "7")
    return {"reward": right, "format_reward": 1.0, "answer_reward": right}
