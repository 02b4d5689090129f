uint16_t crc16_byte(uint16_t crc, uint8_t data) {
  uint16_t c = crc ^ (uint16_t)(data << 8);
  for (int i = 0; i < 8; ++i) c = crc16_shift(c);
  return c;
}
