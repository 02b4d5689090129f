uint8_t crc8_byte(uint8_t crc, uint8_t data) {
  uint8_t c = crc ^ data;
  for (int i = 0; i < 8; ++i) c = crc8_shift(c);
  return c;
}
