uint32_t crc32_shift(uint32_t crc) {
  uint32_t s = crc >> 1;
  if (crc & 1u) s ^= 0xEDB88320u;
  return s;
}
