uint16_t preadd(uint8_t a, uint8_t b) {
  return (uint16_t)a + (uint16_t)b;
}
