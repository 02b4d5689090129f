uint16_t gcd_step(uint16_t ab) {
  uint8_t a = ab >> 8, b = ab & 0xFF;
  if (b == 0) return ab;
  return (uint16_t)((b << 8) | (a % b));
}
