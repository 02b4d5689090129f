def alu(op, a, b):
    if op in (2, 3, 4):
        return alu_logic(op, a, b)
    return alu_arith(op, a, b)
