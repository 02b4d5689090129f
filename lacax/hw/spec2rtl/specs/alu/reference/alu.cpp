uint8_t alu(uint8_t op, uint8_t a, uint8_t b) {
  if (op >= 2 && op <= 4) return alu_logic(op, a, b);
  return alu_arith(op, a, b);
}
